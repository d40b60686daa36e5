// Schemas of busseg::adaptive_patch_cutmix (PH-Net Eq. 5-7; docs/ops.md): the mask and the gather.
// cutmix_patch_mask: from hardness (B, Nh, Nw) and uniforms (B, 1 + Nh*Nw) float32 (column 0 draws
// the share of patches replaced, the rest each patch's key), the (B, Nh, Nw) bool mask, True =
// kept: the shield_count hardest patches kept, n = round(U(low, high) * Nh*Nw) (capped) of the
// others replaced, by their keys. adaptive_patch_cutmix: every tensor (B, ..., H, W) takes image
// (b+1) mod B where patch_mask is False. No gradient.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(busseg, m) {
  m.def(
      "cutmix_patch_mask(Tensor hardness, Tensor uniforms, int shield_count, float low, "
      "float high) -> Tensor");
  m.def("adaptive_patch_cutmix(Tensor[] tensors, Tensor patch_mask) -> Tensor[]");
}
