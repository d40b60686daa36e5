// busseg::memory_contrastive_loss: CUDA launchers on raw pointers, the tile kernels of the shared
// driver (common/contrastive_driver.h). Tiles are (rows, cols) row-major float/double blocks of
// dot products.
#pragma once
#include <cuda_runtime.h>

#include "common/cuda_types.h"

namespace busseg::cuda {

// Fold exp(sim/τ) of the entries with yn_j != ya_i into the running (m, s) of each row.
cudaError_t memory_contrastive_loss_lse_update(DType dtype, const void* sim, long long rows,
                                               long long cols, const long long* ya,
                                               const long long* yn, void* m, void* s,
                                               double inv_tau, cudaStream_t stream);
// In place: sim_ij <- coef_i * exp(sim_ij/τ - lse_i) where yn_j != ya_i, else 0.
cudaError_t memory_contrastive_loss_grad_tile(DType dtype, void* sim, long long rows,
                                              long long cols, const long long* ya,
                                              const long long* yn, const void* lse,
                                              const void* coef, double inv_tau,
                                              cudaStream_t stream);

}  // namespace busseg::cuda
