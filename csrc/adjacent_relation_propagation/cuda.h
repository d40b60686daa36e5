// busseg::adjacent_relation_propagation: CUDA launchers on raw pointers. Every tensor is
// contiguous NCHW: feat (B, C, H, W), value, out, grad_out, grad_value (B, K, H, W), weights
// (B, k*k, H, W), grad_feat (B, C, H, W).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "common/cuda_types.h"

namespace busseg::cuda {

struct ArpShape {
  long long B, C, K, H, W;
  int kernel_size, dilation;
  bool valid_padding;
};

// Bytes of device scratch memory (any alignment of 16 or more) the forward needs, 0 for none:
// the general path keeps the affinities of half-precision inputs in float32 there.
size_t adjacent_relation_propagation_scratch_bytes(DType dtype, const ArpShape& s);

// `scratch`: at least adjacent_relation_propagation_scratch_bytes(dtype, s) bytes, or null if 0.
cudaError_t adjacent_relation_propagation(DType dtype, const ArpShape& s, const void* feat,
                                          const void* value, void* out, void* weights,
                                          void* scratch, double scale, cudaStream_t stream);

// Bytes of device scratch memory the backward needs, 0 for none: the general path keeps the
// affinity gradients (B, k*k, H, W) there when grad_feat is wanted.
size_t adjacent_relation_propagation_backward_scratch_bytes(DType dtype, const ArpShape& s,
                                                            bool grad_feat);

// grad_feat / grad_value may be null when not wanted; `scratch` as above.
cudaError_t adjacent_relation_propagation_backward(DType dtype, const ArpShape& s,
                                                   const void* grad_out, const void* feat,
                                                   const void* value, const void* weights,
                                                   void* grad_feat, void* grad_value, void* scratch,
                                                   double scale, cudaStream_t stream);

}  // namespace busseg::cuda
