// Schema of busseg::adaptive_patch_cutmix (PH-Net Eq. 6-7; docs/ops.md), the gather: every tensor
// (B, ..., H, W) takes image (b+1) mod B where patch_mask (B, Nh, Nw) is False. No gradient.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(busseg, m) {
  m.def("adaptive_patch_cutmix(Tensor[] tensors, Tensor patch_mask) -> Tensor[]");
}
