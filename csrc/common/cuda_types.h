// Element types the raw-pointer CUDA launchers accept; bindings map torch dtypes onto these.
#pragma once

namespace busseg::cuda {
enum class DType { f16, bf16, f32, f64 };
}  // namespace busseg::cuda
