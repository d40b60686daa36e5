// Operator schemas of the `busseg` namespace: declared once here, implemented per device in
// csrc/cpu and csrc/cuda; fake kernels and autograd are registered from Python.
#include <torch/library.h>

TORCH_LIBRARY(busseg, m) {
  // §1 adjacent relation propagation. weights come back as (B, H, W, k*k), kept for backward.
  m.def("arp_forward(Tensor feat, Tensor value, int kernel_size, int dilation, float scale, "
        "bool valid_padding) -> (Tensor out, Tensor weights)");
  m.def("arp_backward(Tensor grad_out, Tensor feat, Tensor value, Tensor weights, int kernel_size, "
        "int dilation, float scale, bool valid_padding, bool need_grad_feat, bool need_grad_value) "
        "-> (Tensor grad_feat, Tensor grad_value)");

  // §2 cross-layer relation alignment. Greedy proxy sampling from the given first proxies
  // (B,) -> (B, M) int64. The loss takes the stacked pixel-to-proxy logits (L, B, HW, M) and keeps
  // only the per-row log-sum-exp (L, B, HW) for backward; reduction is "mean" | "batchmean" | "sum".
  m.def("cra_greedy_sampling(Tensor feat, Tensor first, int num_proxies, float scale) -> Tensor");
  m.def("cra_align_forward(Tensor logits, str reduction, float eps) -> (Tensor loss, Tensor lse)");
  m.def("cra_align_backward(Tensor grad_loss, Tensor logits, Tensor lse, str reduction, float eps) "
        "-> Tensor");
}
