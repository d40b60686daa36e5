// busseg::patch_entropy_hardness: CUDA launchers on raw pointers.
// x, dx (B, K, H, W) contiguous; the hardness and its gradient (B, Nh, Nw).
#pragma once
#include <cuda_runtime.h>

#include "common/cuda_types.h"

namespace busseg::cuda {

cudaError_t patch_entropy_hardness(DType dtype, const PatchShape& s, const void* x, void* out,
                                   bool from_logits, double eps, cudaStream_t stream);
cudaError_t patch_entropy_hardness_backward(DType dtype, const PatchShape& s, const void* grad,
                                            const void* x, void* dx, bool from_logits, double eps,
                                            cudaStream_t stream);

}  // namespace busseg::cuda
