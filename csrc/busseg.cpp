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
}
