// Tensor binding of the busseg::patch_entropy_hardness CUDA launchers: validate, make contiguous,
// launch on the current stream.
#include "common/cuda_binding.h"

#include <torch/library.h>

#include "patch_entropy_hardness/checks.h"
#include "patch_entropy_hardness/cuda.h"

namespace busseg::cuda {
namespace {

at::Tensor patch_entropy_hardness_cuda(const at::Tensor& x, int64_t patch_h, int64_t patch_w,
                                       bool from_logits, double eps) {
  const PatchGrid g = check_patch_entropy_hardness_args(x, patch_h, patch_w);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({g.B, g.Nh, g.Nw}, x.options());
  check_launch(patch_entropy_hardness(dtype_of(x), patch_shape(g), xc.data_ptr(), out.data_ptr(),
                                      from_logits, eps, c10::cuda::getCurrentCUDAStream()),
               "patch_entropy_hardness");
  return out;
}

at::Tensor patch_entropy_hardness_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                int64_t patch_h, int64_t patch_w, bool from_logits,
                                                double eps) {
  const PatchGrid g = check_patch_entropy_hardness_backward_args(grad, x, patch_h, patch_w);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), gc = grad.contiguous().to(x.scalar_type());
  at::Tensor dx = at::empty({g.B, g.K, g.H, g.W}, x.options());
  check_launch(patch_entropy_hardness_backward(dtype_of(x), patch_shape(g), gc.data_ptr(),
                                               xc.data_ptr(), dx.data_ptr(), from_logits, eps,
                                               c10::cuda::getCurrentCUDAStream()),
               "patch_entropy_hardness_backward");
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CUDA, m) {
  m.impl("patch_entropy_hardness", &patch_entropy_hardness_cuda);
  m.impl("patch_entropy_hardness_backward", &patch_entropy_hardness_backward_cuda);
}

}  // namespace busseg::cuda
