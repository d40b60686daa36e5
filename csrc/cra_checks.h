// Shape/dtype checks shared by the CPU and CUDA front-ends of CRA (SPEC §2). The Python API
// validates first with friendlier messages; these guard direct torch.ops.busseg calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace busseg {

inline void check_greedy_args(const at::Tensor& feat, const at::Tensor& first, int64_t num_proxies) {
  TORCH_CHECK_VALUE(feat.dim() == 4, "feat must be (B, C, H, W), got ", feat.sizes());
  TORCH_CHECK_VALUE(feat.numel() > 0, "feat is empty (shape ", feat.sizes(), ")");
  const int64_t hw = feat.size(2) * feat.size(3);
  TORCH_CHECK_VALUE(num_proxies >= 1 && num_proxies <= hw, "num_proxies must be in [1, H*W = ", hw,
                    "], got ", num_proxies);
  TORCH_CHECK_VALUE(first.dim() == 1 && first.size(0) == feat.size(0),
                    "first must be (B,) = (", feat.size(0), ",), got ", first.sizes());
  TORCH_CHECK_TYPE(first.scalar_type() == at::kLong, "first must be int64, got ", first.scalar_type());
  TORCH_CHECK_VALUE(first.device() == feat.device(), "feat and first must be on the same device");
  const auto range = first.aminmax();  // one host sync: out-of-range indices would read out of bounds
  TORCH_CHECK_VALUE(std::get<0>(range).item<int64_t>() >= 0 && std::get<1>(range).item<int64_t>() < hw,
                    "first must hold pixel indices in [0, H*W = ", hw, ")");
}

// Checks the stacked logits (L, B, HW, M) and returns the factor the summed KL terms are
// multiplied by: 1 / ((L - 1) * d), d = B*HW*M ("mean"), B ("batchmean") or 1 ("sum").
inline double check_align_args(const at::Tensor& logits, const std::string& reduction, double eps) {
  TORCH_CHECK_VALUE(logits.dim() == 4, "logits must be (L, B, HW, M), got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(0) >= 2, "logits must hold L >= 2 layers, got ", logits.size(0));
  TORCH_CHECK_VALUE(logits.numel() > 0, "logits is empty (shape ", logits.sizes(), ")");
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  const double pairs = static_cast<double>(logits.size(0) - 1);
  if (reduction == "mean")
    return 1.0 / (pairs * static_cast<double>(logits.size(1) * logits.size(2) * logits.size(3)));
  if (reduction == "batchmean") return 1.0 / (pairs * static_cast<double>(logits.size(1)));
  TORCH_CHECK_VALUE(reduction == "sum", "reduction must be 'mean', 'batchmean' or 'sum', got '",
                    reduction, "'");
  return 1.0 / pairs;
}

inline void check_lse(const at::Tensor& logits, const at::Tensor& lse) {
  TORCH_CHECK_VALUE(lse.sizes() == logits.sizes().slice(0, 3), "lse must be (L, B, HW) = ",
                    logits.sizes().slice(0, 3), ", got ", lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == logits.device(), "logits and lse must be on the same device");
}

}  // namespace busseg
