// Argument checks of busseg::memory_contrastive_loss and its backward, shared by the CPU and CUDA
// entry points.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

namespace busseg {

inline void check_memory_contrastive_loss_args(const at::Tensor& anchors,
                                               const at::Tensor& anchor_labels,
                                               const at::Tensor& negatives,
                                               const at::Tensor& negative_labels,
                                               const at::Tensor& positives,
                                               const at::Tensor& has_positive, double temperature) {
  TORCH_CHECK_VALUE(anchors.dim() == 2, "anchors must be (N, D), got ", anchors.sizes());
  TORCH_CHECK_VALUE(negatives.dim() == 2 && negatives.size(1) == anchors.size(1),
                    "negatives must be (N-, D) with D = ", anchors.size(1), ", got ",
                    negatives.sizes());
  TORCH_CHECK_VALUE(
      positives.dim() == 2 && positives.size(1) == anchors.size(1) && positives.size(0) >= 1,
      "positives must be (K, D) with K >= 1 and D = ", anchors.size(1), ", got ",
      positives.sizes());
  TORCH_CHECK_VALUE(anchor_labels.dim() == 1 && anchor_labels.size(0) == anchors.size(0),
                    "anchor_labels must be (N,) with N = ", anchors.size(0), ", got ",
                    anchor_labels.sizes());
  TORCH_CHECK_VALUE(negative_labels.dim() == 1 && negative_labels.size(0) == negatives.size(0),
                    "negative_labels must be (N-,) with N- = ", negatives.size(0), ", got ",
                    negative_labels.sizes());
  TORCH_CHECK_VALUE(has_positive.dim() == 1 && has_positive.size(0) == positives.size(0),
                    "has_positive must be (K,), got ", has_positive.sizes());
  TORCH_CHECK_TYPE(
      anchor_labels.scalar_type() == at::kLong && negative_labels.scalar_type() == at::kLong,
      "anchor_labels and negative_labels must be int64");
  TORCH_CHECK_TYPE(has_positive.scalar_type() == at::kBool, "has_positive must be bool");
  check_floating(anchors, "anchors");
  TORCH_CHECK_TYPE(anchors.scalar_type() == negatives.scalar_type() &&
                       anchors.scalar_type() == positives.scalar_type(),
                   "anchors, negatives and positives must share a dtype");
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
  check_device(anchor_labels, "anchor_labels", anchors, "anchors");
  check_device(negatives, "negatives", anchors, "anchors");
  check_device(negative_labels, "negative_labels", anchors, "anchors");
  check_device(positives, "positives", anchors, "anchors");
  check_device(has_positive, "has_positive", anchors, "anchors");
}

inline void check_memory_contrastive_loss_backward_args(
    const at::Tensor& grad_loss, const at::Tensor& anchors, const at::Tensor& anchor_labels,
    const at::Tensor& negatives, const at::Tensor& negative_labels, const at::Tensor& positives,
    const at::Tensor& has_positive, const at::Tensor& lse, const at::Tensor& weighted_negatives,
    double temperature) {
  check_memory_contrastive_loss_args(anchors, anchor_labels, negatives, negative_labels, positives,
                                     has_positive, temperature);
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == anchors.size(0), "lse must be (N,) = (",
                    anchors.size(0), ",), got ", lse.sizes());
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must be a scalar, got ", grad_loss.sizes());
  check_floating(lse, "lse");
  check_floating(grad_loss, "grad_loss");
  check_device(lse, "lse", anchors, "anchors");
  check_device(grad_loss, "grad_loss", anchors, "anchors");
  const bool rows_of_anchors = weighted_negatives.dim() == 2 &&
                               weighted_negatives.size(0) == anchors.size(0) &&
                               weighted_negatives.size(1) == anchors.size(1);
  const bool none = weighted_negatives.dim() == 1 && weighted_negatives.size(0) == 0;
  TORCH_CHECK_VALUE(none || rows_of_anchors, "weighted_negatives must be (N, D) = (",
                    anchors.size(0), ", ", anchors.size(1), ") or (0,), got ",
                    weighted_negatives.sizes());
  check_floating(weighted_negatives, "weighted_negatives");
  check_device(weighted_negatives, "weighted_negatives", anchors, "anchors");
}

}  // namespace busseg
