// Schemas of busseg::memory_contrastive_loss (PH-Net Eq. 15; docs/ops.md), streamed over tiles of
// negatives. lse (N,) is what backward needs besides the inputs. With save_weighted_negatives the
// forward also returns weighted_negatives (N, D) = Σ_j π_ij n̂_j (π: each anchor's softmax weights
// over its positive and negatives; zero rows for anchors without loss), accumulated with the
// online log-sum-exp: the anchors' gradient then needs no second pass over the tiles. Otherwise
// weighted_negatives is empty (0,).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(busseg, m) {
  m.def(
      "memory_contrastive_loss(Tensor anchors, Tensor anchor_labels, Tensor negatives, "
      "Tensor negative_labels, Tensor positives, Tensor has_positive, float temperature, "
      "bool save_weighted_negatives) -> (Tensor loss, Tensor lse, Tensor weighted_negatives)");
  m.def(
      "memory_contrastive_loss_backward(Tensor grad_loss, Tensor anchors, Tensor anchor_labels, "
      "Tensor negatives, Tensor negative_labels, Tensor positives, Tensor has_positive, "
      "Tensor lse, Tensor weighted_negatives, float temperature, bool need_grad_negatives) "
      "-> (Tensor grad_anchors, Tensor grad_negatives)");
}
