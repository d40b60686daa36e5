// Schemas of busseg::memory_contrastive_loss (PH-Net Eq. 15; docs/ops.md), streamed over tiles of
// negatives; lse (N,) is what backward needs besides the inputs.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(busseg, m) {
  m.def(
      "memory_contrastive_loss(Tensor anchors, Tensor anchor_labels, Tensor negatives, "
      "Tensor negative_labels, Tensor positives, Tensor has_positive, float temperature) "
      "-> (Tensor loss, Tensor lse)");
  m.def(
      "memory_contrastive_loss_backward(Tensor grad_loss, Tensor anchors, Tensor anchor_labels, "
      "Tensor negatives, Tensor negative_labels, Tensor positives, Tensor has_positive, "
      "Tensor lse, float temperature, bool need_grad_negatives) "
      "-> (Tensor grad_anchors, Tensor grad_negatives)");
}
