// Cross-layer relation alignment (SPEC §2): CUDA launchers on raw pointers.
// Greedy sampling: feat (B, HW, C) channels-last, first (B,), out (B, M) int64, on
// blocks_per_image blocks per image (1: one block each; >= 2: cooperating blocks in a cooperative
// launch, which fails unless all B * blocks_per_image blocks fit on the GPU at once).
// cra_greedy_blocks_per_image picks it; the workspace holds cra_greedy_workspace_bytes.
// Loss (the row kernels of the blocked driver, csrc/cra_driver.h): a block of logits (L, R, M)
// contiguous; lse (L, R) and row_loss (R) in the accumulator type; grad_logits like logits.
#pragma once
#include <cuda_runtime.h>

#include "cuda/dtype.h"

namespace busseg::cuda {

// Layers the fused loss kernels handle (per-row statistics live in registers).
constexpr int kMaxAlignLayers = 16;

cudaError_t cra_greedy_blocks_per_image(DType dtype, long long B, long long HW, long long C,
                                        long long* blocks_per_image);

size_t cra_greedy_workspace_bytes(DType dtype, long long B, long long HW,
                                  long long blocks_per_image);

cudaError_t cra_greedy_sampling(DType dtype, long long B, long long HW, long long C, long long M,
                                long long blocks_per_image, const void* feat,
                                const long long* first, double scale, void* workspace,
                                long long* out, cudaStream_t stream);

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
