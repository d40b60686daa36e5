// busseg::memory_contrastive_loss: CUDA launchers on raw pointers, the epilogues of the similarity
// tiles that cuBLAS forms (memory_contrastive_loss/cuda_binding.cpp). A tile is a (rows, cols)
// row-major block of dot products <â_i, n̂_j> (float, or double for double inputs); classes are
// int32 keys: an anchor's class, -1 for an ignored anchor (no loss: its row is left alone); a
// negative's class, -2 for a label outside [0, K) (it counts for every anchor). A pair counts when
// the keys differ.
#pragma once
#include <cuda_runtime.h>

#include "common/cuda_types.h"

namespace busseg::cuda {

// Columns a tile may have: a row is held in registers, 256 threads x 32 values.
constexpr long long kContrastiveMaxCols = 8192;

struct ContrastiveTile {
  long long rows, cols;
  const int* anchor_keys;    // (rows,)
  const int* negative_keys;  // (cols,)
};

// Folds exp(sim/τ) of the counted pairs of each row into its running max m and scaled sum s
// (accumulator type, the rows of this tile). With `weights` (not null): also writes the weights
// e^{sim/τ - m_new} of the counted pairs (0 elsewhere, and on ignored rows) as a (rows, cols)
// row-major tile of `weights_dtype` (it may be sim itself when of sim's dtype), and `alpha` =
// e^{m_old - m_new} per row (by which the caller rescales what it accumulated with the old max).
cudaError_t memory_contrastive_loss_softmax_tile(DType sim_dtype, const void* sim,
                                                 const ContrastiveTile& tile, void* m, void* s,
                                                 double inv_tau, DType weights_dtype, void* weights,
                                                 void* alpha, cudaStream_t stream);

// grad_ij = coef_i e^{sim_ij/τ - lse_i} for the counted pairs of rows with coef_i != 0, else 0,
// into a (rows, cols) row-major tile of `grad_dtype` (it may be sim itself when of sim's dtype);
// lse and coef in the accumulator type.
cudaError_t memory_contrastive_loss_grad_tile(DType sim_dtype, const void* sim,
                                              const ContrastiveTile& tile, const void* lse,
                                              const void* coef, double inv_tau, DType grad_dtype,
                                              void* grad, cudaStream_t stream);

}  // namespace busseg::cuda
