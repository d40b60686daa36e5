// Schemas of busseg::adjacent_relation_propagation (RA-BUSSeg's ARP; docs/ops.md): the softmax of
// scaled feature affinities over each pixel's k×k neighbourhood weights its neighbours' values.
// weights (B, k*k, H, W) are kept for backward.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(busseg, m) {
  m.def(
      "adjacent_relation_propagation(Tensor feat, Tensor value, int kernel_size, int dilation, "
      "float scale, bool valid_padding) -> (Tensor out, Tensor weights)");
  m.def(
      "adjacent_relation_propagation_backward(Tensor grad_out, Tensor feat, Tensor value, "
      "Tensor weights, int kernel_size, int dilation, float scale, bool valid_padding, "
      "bool need_grad_feat, bool need_grad_value) -> (Tensor grad_feat, Tensor grad_value)");
}
