// Argument checks shared by the ops' C++ entry points (every registered forward and backward).
// They run before any memory is touched, so a direct torch.ops.busseg.* call with bad arguments
// raises a Python exception naming the argument (ValueError / TypeError, both c10 errors) instead
// of reading out of bounds. The Python front-ends validate first, with friendlier messages.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace busseg {

// Sizes and reaches bounded by 2^30 keep index arithmetic in 32 bits where kernels use int
// (CUDA and Triton coordinates), with room for a sum of two of them.
constexpr int64_t kMaxExtent = int64_t(1) << 30;

inline void check_dims(const at::Tensor& t, const char* name, int64_t dims, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dims, name, " must have ", dims, " dims ", layout, ", got shape ",
                    t.sizes());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected,
                        const char* layout) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, " must be ", layout, " = ", expected, ", got ",
                    t.sizes());
}

// Same device as `ref` (a CPU kernel must never get a meta or CUDA pointer, nor the reverse).
inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                         const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// float32, float64, float16 or bfloat16 (the narrow two with float32 accumulation).
inline void check_floating(const at::Tensor& t, const char* name) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
                   name, " must be float32, float64, float16 or bfloat16, got ", s);
}

inline void check_range(int64_t v, const char* name, int64_t lo, int64_t hi) {
  TORCH_CHECK_VALUE(v >= lo && v <= hi, name, " must be in [", lo, ", ", hi, "], got ", v);
}

}  // namespace busseg
