// Plain types the raw-pointer CUDA launchers take; bindings map torch tensors onto these.
#pragma once

namespace busseg::cuda {

enum class DType { f16, bf16, f32, f64 };

// B images of H×W pixels (K classes for the hardness) cut into patches of ph×pw pixels.
struct PatchShape {
  long long B, K, H, W;
  int ph, pw;  // patch size; Nh = H / ph, Nw = W / pw
};

}  // namespace busseg::cuda
