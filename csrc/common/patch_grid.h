// The patch grid of the PH-Net patch ops (patch_entropy_hardness, adaptive_patch_cutmix).
#pragma once
#include <cstdint>

namespace busseg {

// B images of H×W pixels (K classes for hardness) cut into Nh×Nw patches of ph×pw pixels.
struct PatchGrid {
  int64_t B, K, H, W, ph, pw, Nh, Nw;
};

}  // namespace busseg
