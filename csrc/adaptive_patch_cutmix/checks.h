// Argument checks of busseg::adaptive_patch_cutmix and busseg::cutmix_patch_mask, shared by the
// CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "common/patch_grid.h"

namespace busseg {

inline PatchGrid check_adaptive_patch_cutmix_args(at::TensorList tensors,
                                                  const at::Tensor& patch_mask) {
  TORCH_CHECK_VALUE(patch_mask.dim() == 3, "patch_mask must be (B, Nh, Nw), got ",
                    patch_mask.sizes());
  check_dtype(patch_mask, "patch_mask", at::kBool);
  TORCH_CHECK_VALUE(!tensors.empty(), "tensors must not be empty");
  const int64_t B = patch_mask.size(0), Nh = patch_mask.size(1), Nw = patch_mask.size(2);
  TORCH_CHECK_VALUE(tensors[0].dim() >= 3, "tensors[0] must be (B, ..., H, W), got ",
                    tensors[0].sizes());
  const int64_t H = tensors[0].size(-2), W = tensors[0].size(-1);
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK_VALUE(t.dim() >= 3 && t.size(0) == B && t.size(-2) == H && t.size(-1) == W,
                      "every tensor must be (B, ..., H, W) with B = ", B, " and H×W = ", H, "×", W,
                      ", got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == patch_mask.device(),
                      "tensors and patch_mask must share a device");
  }
  // H <= kMaxExtent keeps the patch size in the 32-bit ints of the CUDA kernel
  TORCH_CHECK_VALUE(
      Nh >= 1 && Nw >= 1 && H % Nh == 0 && W % Nw == 0 && H <= kMaxExtent && W <= kMaxExtent,
      "the ", Nh, "×", Nw, " patch grid must divide the map size (", H, ", ", W, ")");
  return {B, 0, H, W, H / Nh, W / Nw, Nh, Nw};
}

// hardness (B, Nh, Nw) and uniforms (B, 1 + Nh * Nw) floating (the share's draw, then each
// patch's key; the kernels read them as float32), 0 <= shield_count <= Nh * Nw,
// 0 <= low <= high <= 1. Returns Nh * Nw.
inline int64_t check_cutmix_patch_mask_args(const at::Tensor& hardness, const at::Tensor& uniforms,
                                            int64_t shield_count, double low, double high) {
  check_dims(hardness, "hardness", 3, "(B, Nh, Nw)");
  check_floating(hardness, "hardness");
  const int64_t B = hardness.size(0), patches = hardness.size(1) * hardness.size(2);
  // below 2^30 keeps the patch indices and their power-of-two padding in the kernels' ints
  TORCH_CHECK_VALUE(patches >= 1 && patches <= kMaxExtent,
                    "hardness must have 1 to 2^30 patches, got ", hardness.sizes());
  check_shape(uniforms, "uniforms", {B, 1 + patches}, "(B, 1 + Nh * Nw)");
  check_floating(uniforms, "uniforms");
  check_device(uniforms, "uniforms", hardness, "hardness");
  check_range(shield_count, "shield_count", 0, patches);
  TORCH_CHECK_VALUE(0.0 <= low && low <= high && high <= 1.0,
                    "low and high must satisfy 0 <= low <= high <= 1, got ", low, " and ", high);
  return patches;
}

}  // namespace busseg
