// busseg::cross_layer_alignment_loss: CUDA launchers on raw pointers, the row kernels of the
// blocked driver (common/cra_driver.h): a block of logits (L, R, M) contiguous, float32 or float64
// (the binding forms half inputs' logits in float32); lse (L, R) and row_loss (R) in the logits'
// type; grad_logits (L, R, M) in the inputs' type.
#pragma once
#include <cuda_runtime.h>

#include "common/cuda_types.h"

namespace busseg::cuda {

struct AlignShape {
  int L;
  long long R, M;  // R = B*HW pixel rows
};

cudaError_t cross_layer_alignment_loss_rows(DType dtype, const AlignShape& s, const void* logits,
                                            double eps, void* lse, void* row_loss,
                                            cudaStream_t stream);

// grad_logits = d(loss)/d(logits) for loss = norm * sum of the row KL terms, in grad_dtype (the
// inputs' dtype; logits float32 for half inputs); grad_loss is a device scalar of grad_dtype.
cudaError_t cross_layer_alignment_loss_rows_backward(DType logits_dtype, DType grad_dtype,
                                                     const AlignShape& s, const void* grad_loss,
                                                     const void* logits, const void* lse,
                                                     double eps, double norm, void* grad_logits,
                                                     cudaStream_t stream);

}  // namespace busseg::cuda
