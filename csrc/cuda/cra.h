// Cross-layer relation alignment (SPEC §2): CUDA launchers on raw pointers.
// Greedy sampling: feat (B, HW, C) channels-last, first (B,), out (B, M) int64; scratch holds
// 2*B*HW accumulators (double for f64, else float) and B*HW bytes.
// Loss: logits (L, B*HW, M) contiguous; lse (L, B*HW) and row_loss (B*HW) in the accumulator type;
// grad_logits like logits.
#pragma once
#include <cuda_runtime.h>

#include "cuda/dtype.h"

namespace busseg::cuda {

// Layers the fused loss kernels handle (per-row statistics live in registers).
constexpr int kMaxAlignLayers = 16;

cudaError_t cra_greedy_sampling(DType dtype, long long B, long long HW, long long C, long long M,
                                const void* feat, const long long* first, double scale,
                                void* acc_scratch, unsigned char* chosen_scratch, long long* out,
                                cudaStream_t stream);

struct AlignShape {
  int L;
  long long R, M;  // R = B*HW pixel rows
};

cudaError_t cra_align_forward(DType dtype, const AlignShape& s, const void* logits, double eps,
                              void* lse, void* row_loss, cudaStream_t stream);

// grad_logits = d(loss)/d(logits) for loss = norm * sum of the row KL terms; grad_loss is a
// device scalar of the logits' dtype.
cudaError_t cra_align_backward(DType dtype, const AlignShape& s, const void* grad_loss,
                               const void* logits, const void* lse, double eps, double norm,
                               void* grad_logits, cudaStream_t stream);

}  // namespace busseg::cuda
