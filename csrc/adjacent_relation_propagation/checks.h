// Argument checks of busseg::adjacent_relation_propagation and its backward, shared by the CPU and
// CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>

#include "common/checks.h"

namespace busseg {

// kernel_size^2 taps stay below 2^30; the reach dilation * (kernel_size / 2) and the map sizes
// below kMaxExtent, so neighbour coordinates y + dilation * dy fit in 32 bits.
constexpr int64_t kMaxKernelSize = 32767;

inline void check_adjacent_relation_propagation_args(const at::Tensor& feat,
                                                     const at::Tensor& value, int64_t kernel_size,
                                                     int64_t dilation) {
  check_dims(feat, "feat", 4, "(B, C, H, W)");
  check_dims(value, "value", 4, "(B, K, H, W)");
  TORCH_CHECK_VALUE(feat.size(0) == value.size(0) && feat.size(2) == value.size(2) &&
                        feat.size(3) == value.size(3),
                    "feat ", feat.sizes(), " and value ", value.sizes(),
                    " must share batch and spatial sizes");
  TORCH_CHECK_VALUE(feat.size(2) <= kMaxExtent && feat.size(3) <= kMaxExtent,
                    "feat's H and W must be <= 2^30, got ", feat.sizes());
  TORCH_CHECK_VALUE(kernel_size >= 1 && kernel_size % 2 == 1 && kernel_size <= kMaxKernelSize,
                    "kernel_size must be odd and in [1, ", kMaxKernelSize, "], got ", kernel_size);
  TORCH_CHECK_VALUE(dilation >= 1, "dilation must be >= 1, got ", dilation);
  TORCH_CHECK_VALUE(dilation <= kMaxExtent / std::max<int64_t>(1, kernel_size / 2),
                    "dilation * (kernel_size // 2) must be <= 2^30, got dilation ", dilation,
                    " with kernel_size ", kernel_size);
  check_floating(feat, "feat");
  TORCH_CHECK_TYPE(feat.scalar_type() == value.scalar_type(), "feat (", feat.scalar_type(),
                   ") and value (", value.scalar_type(), ") must have the same dtype");
  check_device(value, "value", feat, "feat");
}

inline void check_adjacent_relation_propagation_backward_args(
    const at::Tensor& grad_out, const at::Tensor& feat, const at::Tensor& value,
    const at::Tensor& weights, int64_t kernel_size, int64_t dilation) {
  check_adjacent_relation_propagation_args(feat, value, kernel_size, dilation);
  const int64_t B = feat.size(0), H = feat.size(2), W = feat.size(3);
  check_shape(grad_out, "grad_out", {B, value.size(1), H, W}, "(B, K, H, W)");
  check_shape(weights, "weights", {B, kernel_size * kernel_size, H, W}, "(B, k*k, H, W)");
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&weights, "weights"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == feat.scalar_type(), name, " must have feat's dtype (",
                     feat.scalar_type(), "), got ", t->scalar_type());
    check_device(*t, name, feat, "feat");
  }
}

}  // namespace busseg
