// Operator schemas of the `busseg` namespace: declared once here, implemented per device in
// csrc/cpu and csrc/cuda; fake kernels and autograd are registered from Python.
#include <torch/library.h>

TORCH_LIBRARY(busseg, m) {
  // §1 adjacent relation propagation. weights (B, k*k, H, W) are kept for backward.
  m.def(
      "arp_forward(Tensor feat, Tensor value, int kernel_size, int dilation, float scale, "
      "bool valid_padding) -> (Tensor out, Tensor weights)");
  m.def(
      "arp_backward(Tensor grad_out, Tensor feat, Tensor value, Tensor weights, int kernel_size, "
      "int dilation, float scale, bool valid_padding, bool need_grad_feat, bool need_grad_value) "
      "-> (Tensor grad_feat, Tensor grad_value)");

  // §2 cross-layer relation alignment. Greedy proxy sampling from the given first proxies
  // (B,) -> (B, M) int64. The loss takes the stacked pixel-to-proxy logits (L, B, HW, M) and keeps
  // only the per-row log-sum-exp (L, B, HW) for backward; reduction is "mean" | "batchmean" |
  // "sum".
  m.def("cra_greedy_sampling(Tensor feat, Tensor first, int num_proxies, float scale) -> Tensor");
  m.def("cra_align_forward(Tensor logits, str reduction, float eps) -> (Tensor loss, Tensor lse)");
  m.def(
      "cra_align_backward(Tensor grad_loss, Tensor logits, Tensor lse, str reduction, float eps) "
      "-> Tensor");

  // ---- PH-Net ops (SPEC §3, §4, §6; issue 4) ----
  // §3 patch-entropy hardness: x (B, K, H, W) -> (B, H/patch_h, W/patch_w).
  m.def(
      "patch_entropy_hardness_forward(Tensor x, int patch_h, int patch_w, bool from_logits, "
      "float eps) -> Tensor");
  m.def(
      "patch_entropy_hardness_backward(Tensor grad, Tensor x, int patch_h, int patch_w, "
      "bool from_logits, float eps) -> Tensor");
  // §4 cutmix gather: every tensor (B, ..., H, W) takes image (b+1) mod B where patch_mask is
  // False.
  m.def("patch_cutmix(Tensor[] tensors, Tensor patch_mask) -> Tensor[]");
  // §6 streaming contrastive loss; lse (N,) is what backward needs besides the inputs.
  m.def(
      "memory_contrastive_forward(Tensor anchors, Tensor anchor_labels, Tensor negatives, "
      "Tensor negative_labels, Tensor positives, Tensor has_positive, float temperature) "
      "-> (Tensor loss, Tensor lse)");
  m.def(
      "memory_contrastive_backward(Tensor grad_loss, Tensor anchors, Tensor anchor_labels, "
      "Tensor negatives, Tensor negative_labels, Tensor positives, Tensor has_positive, "
      "Tensor lse, float temperature, bool need_grad_negatives) "
      "-> (Tensor grad_anchors, Tensor grad_negatives)");
}
