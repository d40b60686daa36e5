// PH-Net ops (SPEC §3, §4, §6): CUDA launchers on raw pointers.
// x, dx (B, K, H, W) contiguous; hardness and its gradient (B, Nh, Nw); the patch mask (B, Nh, Nw)
// bool. Contrastive tiles are (rows, cols) row-major float/double blocks of dot products.
#pragma once
#include <cuda_runtime.h>

#include "cuda/dtype.h"

namespace busseg::cuda {

struct PatchShape {
  long long B, K, H, W;
  int ph, pw;  // patch size; Nh = H / ph, Nw = W / pw
};

cudaError_t hardness_forward(DType dtype, const PatchShape& s, const void* x, void* out,
                             bool from_logits, double eps, cudaStream_t stream);
cudaError_t hardness_backward(DType dtype, const PatchShape& s, const void* grad, const void* x,
                              void* dx, bool from_logits, double eps, cudaStream_t stream);

// Up to kCutmixBatch tensors per launch, each (B, R, H, W) contiguous with rows of W elements.
constexpr int kCutmixBatch = 8;
struct CutmixTensor {
  const void* src;
  void* dst;
  long long numel;  // B * R * H * W
  int elem_size;    // 1, 2, 4 or 8 bytes
};
struct CutmixBatch {
  CutmixTensor t[kCutmixBatch];
  int count;
};
cudaError_t patch_cutmix(const CutmixBatch& batch, const bool* mask, const PatchShape& s,
                         cudaStream_t stream);

// Fold exp(sim/τ) of the entries with yn_j != ya_i into the running (m, s) of each row.
cudaError_t contrastive_lse_update(DType dtype, const void* sim, long long rows, long long cols,
                                   const long long* ya, const long long* yn, void* m, void* s,
                                   double inv_tau, cudaStream_t stream);
// In place: sim_ij <- coef_i * exp(sim_ij/τ - lse_i) where yn_j != ya_i, else 0.
cudaError_t contrastive_grad_tile(DType dtype, void* sim, long long rows, long long cols,
                                  const long long* ya, const long long* yn, const void* lse,
                                  const void* coef, double inv_tau, cudaStream_t stream);

}  // namespace busseg::cuda
