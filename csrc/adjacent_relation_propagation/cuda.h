// busseg::adjacent_relation_propagation: CUDA launchers on raw pointers.
// feat (B, H, W, C) and value (B, H, W, K) are channels-last; out and grad_out are (B, K, H, W);
// weights (B, taps, H, W); grad_feat (B, H, W, C); grad_value (B, K, H, W).
#pragma once
#include <cuda_runtime.h>

#include "common/cuda_types.h"

namespace busseg::cuda {

struct ArpShape {
  long long B, C, K, H, W;
  int kernel_size, dilation;
  bool valid_padding;
};

cudaError_t adjacent_relation_propagation(DType dtype, const ArpShape& s, const void* feat,
                                          const void* value, void* out, void* weights, double scale,
                                          cudaStream_t stream);

// `da_scratch` holds B*H*W*taps accumulators (double for f64, else float); grad_feat / grad_value
// may be null when not wanted.
cudaError_t adjacent_relation_propagation_backward(DType dtype, const ArpShape& s,
                                                   const void* grad_out, const void* feat,
                                                   const void* value, const void* weights,
                                                   void* grad_feat, void* grad_value,
                                                   void* da_scratch, double scale,
                                                   cudaStream_t stream);

}  // namespace busseg::cuda
