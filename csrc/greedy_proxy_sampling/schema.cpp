// Schema of busseg::greedy_proxy_sampling (RA-BUSSeg's "weak cross-correlation" proxies;
// docs/ops.md): from the first proxies (B,), each next proxy minimises the running max of the
// cumulative similarity to those chosen so far -> (B, M) int64. No gradient.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(busseg, m) {
  m.def("greedy_proxy_sampling(Tensor feat, Tensor first, int num_proxies, float scale) -> Tensor");
}
