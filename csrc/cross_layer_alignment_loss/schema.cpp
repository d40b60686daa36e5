// Schemas of busseg::cross_layer_alignment_loss (RA-BUSSeg's CRA loss; docs/ops.md). The loss
// works on feats[l] (B, C_l, HW) and proxies[l] (B, M, C_l) directly, block_rows pixel rows at a
// time (the (L, B, HW, M) logits never exist), and keeps only the per-row log-sum-exp (L, B, HW)
// for backward, which recomputes each block's logits; reduction is "mean" | "batchmean" | "sum".
// With grad_proxies the forward also returns the proxy gradients for a unit grad_loss (else an
// empty list), formed from the logit blocks it already has, so that backward needs no
// recomputation when only the proxies need a gradient. Backward returns empty lists for the
// gradients it was not asked for.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(busseg, m) {
  m.def(
      "cross_layer_alignment_loss(Tensor[] feats, Tensor[] proxies, str reduction, float eps, "
      "int block_rows, bool grad_proxies) -> (Tensor loss, Tensor lse, Tensor[] grad_proxies)");
  m.def(
      "cross_layer_alignment_loss_backward(Tensor grad_loss, Tensor[] feats, Tensor[] proxies, "
      "Tensor lse, str reduction, float eps, int block_rows, bool need_grad_feats, "
      "bool need_grad_proxies) -> (Tensor[] grad_feats, Tensor[] grad_proxies)");
}
