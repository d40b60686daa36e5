// busseg::cross_layer_alignment_loss: CUDA launchers on raw pointers, the row kernels of the
// blocked driver (common/cra_driver.h): a block of logits (L, R, M) contiguous; lse (L, R) and
// row_loss (R) in the accumulator type; grad_logits like logits.
#pragma once
#include <cuda_runtime.h>

#include "common/cuda_types.h"

namespace busseg::cuda {

// Layers the fused loss kernels handle (per-row statistics live in registers).
constexpr int kMaxAlignLayers = 16;

struct AlignShape {
  int L;
  long long R, M;  // R = B*HW pixel rows
};

cudaError_t cross_layer_alignment_loss_rows(DType dtype, const AlignShape& s, const void* logits,
                                            double eps, void* lse, void* row_loss,
                                            cudaStream_t stream);

// grad_logits = d(loss)/d(logits) for loss = norm * sum of the row KL terms; grad_loss is a
// device scalar of the logits' dtype.
cudaError_t cross_layer_alignment_loss_rows_backward(DType dtype, const AlignShape& s,
                                                     const void* grad_loss, const void* logits,
                                                     const void* lse, double eps, double norm,
                                                     void* grad_logits, cudaStream_t stream);

}  // namespace busseg::cuda
