// Argument checks of busseg::patch_entropy_hardness and its backward, shared by the CPU and CUDA
// entry points.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "common/patch_grid.h"

namespace busseg {

inline PatchGrid check_patch_entropy_hardness_args(const at::Tensor& x, int64_t patch_h,
                                                   int64_t patch_w) {
  check_dims(x, "x", 4, "(B, K, H, W)");
  TORCH_CHECK_VALUE(x.size(1) >= 2, "x needs K >= 2 classes, got ", x.size(1));
  check_floating(x, "x");
  // patch_h <= H <= kMaxExtent also keeps the patch size in the 32-bit ints of the CUDA kernels
  TORCH_CHECK_VALUE(patch_h >= 1 && patch_w >= 1 && patch_h <= kMaxExtent &&
                        patch_w <= kMaxExtent && x.size(2) % patch_h == 0 &&
                        x.size(3) % patch_w == 0,
                    "patch size (", patch_h, ", ", patch_w, ") must divide the map size (",
                    x.size(2), ", ", x.size(3), ")");
  return {x.size(0), x.size(1), x.size(2),           x.size(3),
          patch_h,   patch_w,   x.size(2) / patch_h, x.size(3) / patch_w};
}

inline PatchGrid check_patch_entropy_hardness_backward_args(const at::Tensor& grad,
                                                            const at::Tensor& x, int64_t patch_h,
                                                            int64_t patch_w) {
  const PatchGrid g = check_patch_entropy_hardness_args(x, patch_h, patch_w);
  check_shape(grad, "grad", {g.B, g.Nh, g.Nw}, "(B, Nh, Nw)");
  check_floating(grad, "grad");
  check_device(grad, "grad", x, "x");
  return g;
}

}  // namespace busseg
