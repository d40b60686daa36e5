// Schemas of busseg::patch_entropy_hardness (PH-Net Eq. 4; docs/ops.md): x (B, K, H, W)
// probabilities or logits -> (B, H/patch_h, W/patch_w) mean normalised entropy per patch.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(busseg, m) {
  m.def(
      "patch_entropy_hardness(Tensor x, int patch_h, int patch_w, bool from_logits, float eps) "
      "-> Tensor");
  m.def(
      "patch_entropy_hardness_backward(Tensor grad, Tensor x, int patch_h, int patch_w, "
      "bool from_logits, float eps) -> Tensor");
}
