// Helpers for the thin tensor bindings of the CUDA launchers (CUDA builds only).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/cuda_types.h"
#include "common/patch_grid.h"

namespace busseg::cuda {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::f16;
    case at::kBFloat16:
      return DType::bf16;
    case at::kFloat:
      return DType::f32;
    case at::kDouble:
      return DType::f64;
    default:
      TORCH_CHECK_TYPE(false, "expected a floating tensor, got ", t.scalar_type());
  }
}

inline at::ScalarType accumulator_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// The launchers' patch shape of a checked grid (its patch sizes are at most 2^30).
inline PatchShape patch_shape(const PatchGrid& g) {
  return {g.B, g.K, g.H, g.W, static_cast<int>(g.ph), static_cast<int>(g.pw)};
}

}  // namespace busseg::cuda
