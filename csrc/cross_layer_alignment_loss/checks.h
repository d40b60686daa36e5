// Argument checks of busseg::cross_layer_alignment_loss and its backward, shared by the CPU and
// CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "common/checks.h"

namespace busseg {

inline void check_cross_layer_alignment_loss_args(at::TensorList feats, at::TensorList proxies,
                                                  const std::string& reduction, double eps,
                                                  int64_t block_rows) {
  TORCH_CHECK_VALUE(feats.size() >= 2, "feats must hold L >= 2 layers, got ", feats.size());
  TORCH_CHECK_VALUE(proxies.size() == feats.size(), "proxies must hold L = ", feats.size(),
                    " tensors, got ", proxies.size());
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(block_rows >= 1, "block_rows must be >= 1, got ", block_rows);
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "batchmean" || reduction == "sum",
                    "reduction must be 'mean', 'batchmean' or 'sum', got '", reduction, "'");
  const at::Tensor& f0 = feats[0];
  const at::Tensor& p0 = proxies[0];
  TORCH_CHECK_VALUE(f0.dim() == 3, "feats[0] must be (B, C_l, HW), got ", f0.sizes());
  TORCH_CHECK_VALUE(p0.dim() == 3, "proxies[0] must be (B, M, C_l), got ", p0.sizes());
  check_floating(f0, "feats[0]");
  const int64_t B = f0.size(0), HW = f0.size(2), M = p0.size(1);
  TORCH_CHECK_VALUE(B > 0 && HW > 0 && M > 0, "the loss inputs are empty (B = ", B, ", HW = ", HW,
                    ", M = ", M, ")");
  for (size_t l = 0; l < feats.size(); ++l) {
    const at::Tensor &f = feats[l], &p = proxies[l];
    TORCH_CHECK_VALUE(f.dim() == 3 && f.size(0) == B && f.size(2) == HW && f.size(1) > 0, "feats[",
                      l, "] must be (B, C_l, HW) with B = ", B, ", HW = ", HW, ", got ", f.sizes());
    TORCH_CHECK_VALUE(p.dim() == 3 && p.size(0) == B && p.size(1) == M && p.size(2) == f.size(1),
                      "proxies[", l, "] must be (B, M, C_l) = (", B, ", ", M, ", ", f.size(1),
                      "), got ", p.sizes());
    TORCH_CHECK_TYPE(f.scalar_type() == f0.scalar_type() && p.scalar_type() == f0.scalar_type(),
                     "feats and proxies must share one dtype");
    TORCH_CHECK_VALUE(f.device() == f0.device() && p.device() == f0.device(),
                      "feats and proxies must be on one device");
  }
}

inline void check_cross_layer_alignment_loss_backward_args(
    const at::Tensor& grad_loss, at::TensorList feats, at::TensorList proxies,
    const at::Tensor& lse, const std::string& reduction, double eps, int64_t block_rows) {
  check_cross_layer_alignment_loss_args(feats, proxies, reduction, eps, block_rows);
  const at::Tensor& f0 = feats[0];
  const int64_t L = static_cast<int64_t>(feats.size());
  TORCH_CHECK_VALUE(
      lse.dim() == 3 && lse.size(0) == L && lse.size(1) == f0.size(0) && lse.size(2) == f0.size(2),
      "lse must be (L, B, HW) = (", L, ", ", f0.size(0), ", ", f0.size(2), "), got ", lse.sizes());
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must be a scalar, got ", grad_loss.sizes());
  check_floating(lse, "lse");
  check_floating(grad_loss, "grad_loss");
  check_device(lse, "lse", f0, "feats[0]");
  check_device(grad_loss, "grad_loss", f0, "feats[0]");
}

}  // namespace busseg
