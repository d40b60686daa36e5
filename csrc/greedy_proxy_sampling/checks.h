// Argument checks of busseg::greedy_proxy_sampling, shared by the CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

namespace busseg {

inline void check_greedy_proxy_sampling_args(const at::Tensor& feat, const at::Tensor& first,
                                             int64_t num_proxies) {
  check_dims(feat, "feat", 4, "(B, C, H, W)");
  TORCH_CHECK_VALUE(feat.numel() > 0, "feat is empty (shape ", feat.sizes(), ")");
  check_floating(feat, "feat");
  const int64_t hw = feat.size(2) * feat.size(3);
  TORCH_CHECK_VALUE(num_proxies >= 1 && num_proxies <= hw, "num_proxies must be in [1, H*W = ", hw,
                    "], got ", num_proxies);
  TORCH_CHECK_VALUE(first.dim() == 1 && first.size(0) == feat.size(0), "first must be (B,) = (",
                    feat.size(0), ",), got ", first.sizes());
  TORCH_CHECK_TYPE(first.scalar_type() == at::kLong, "first must be int64, got ",
                   first.scalar_type());
  TORCH_CHECK_VALUE(first.device() == feat.device(), "feat and first must be on the same device");
  const auto range =
      first.aminmax();  // one host sync: out-of-range indices would read out of bounds
  TORCH_CHECK_VALUE(
      std::get<0>(range).item<int64_t>() >= 0 && std::get<1>(range).item<int64_t>() < hw,
      "first must hold pixel indices in [0, H*W = ", hw, ")");
}

}  // namespace busseg
