// Shape checks shared by the CPU and CUDA front-ends of the PH-Net patch ops (SPEC §3–§4). The
// Python API validates first with friendlier messages; these guard direct torch.ops.busseg calls.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace busseg {

// B images of H×W pixels (K classes for hardness) cut into Nh×Nw patches of ph×pw pixels.
struct PatchGrid {
  int64_t B, K, H, W, ph, pw, Nh, Nw;
};

inline PatchGrid check_hardness_args(const at::Tensor& x, int64_t patch_h, int64_t patch_w) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be (B, K, H, W), got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 2, "x needs K >= 2 classes, got ", x.size(1));
  TORCH_CHECK_VALUE(
      patch_h >= 1 && patch_w >= 1 && x.size(2) % patch_h == 0 && x.size(3) % patch_w == 0,
      "patch size (", patch_h, ", ", patch_w, ") must divide the map size (", x.size(2), ", ",
      x.size(3), ")");
  return {x.size(0), x.size(1), x.size(2),           x.size(3),
          patch_h,   patch_w,   x.size(2) / patch_h, x.size(3) / patch_w};
}

inline PatchGrid check_cutmix_args(at::TensorList tensors, const at::Tensor& patch_mask) {
  TORCH_CHECK_VALUE(patch_mask.dim() == 3 && patch_mask.scalar_type() == at::kBool,
                    "patch_mask must be a bool (B, Nh, Nw) tensor, got ", patch_mask.sizes());
  TORCH_CHECK_VALUE(!tensors.empty(), "tensors must not be empty");
  const int64_t B = patch_mask.size(0), Nh = patch_mask.size(1), Nw = patch_mask.size(2);
  const int64_t H = tensors[0].size(-2), W = tensors[0].size(-1);
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK_VALUE(t.dim() >= 3 && t.size(0) == B && t.size(-2) == H && t.size(-1) == W,
                      "every tensor must be (B, ..., H, W) with B = ", B, " and H×W = ", H, "×", W,
                      ", got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == patch_mask.device(),
                      "tensors and patch_mask must share a device");
  }
  TORCH_CHECK_VALUE(Nh >= 1 && Nw >= 1 && H % Nh == 0 && W % Nw == 0, "the ", Nh, "×", Nw,
                    " patch grid must divide the map size (", H, ", ", W, ")");
  return {B, 0, H, W, H / Nh, W / Nw, Nh, Nw};
}

}  // namespace busseg
