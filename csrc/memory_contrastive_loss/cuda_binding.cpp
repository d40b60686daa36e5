// Tensor binding of the PH-Net CUDA launchers (SPEC §3, §4, §6): validate, make contiguous,
// launch on the current stream. The contrastive loss runs the shared tiled driver with cuBLAS
// tiles; half/bfloat16 inputs are computed in float32 and the gradients cast back.
#include <torch/library.h>

#include <algorithm>

#include "contrastive_driver.h"
#include "cuda/binding.h"
#include "cuda/phnet.h"
#include "phnet_checks.h"

namespace busseg::cuda {
namespace {

PatchShape patch_shape(const PatchGrid& g) {
  return {g.B, g.K, g.H, g.W, static_cast<int>(g.ph), static_cast<int>(g.pw)};
}

at::Tensor hardness_forward_cuda(const at::Tensor& x, int64_t patch_h, int64_t patch_w,
                                 bool from_logits, double eps) {
  const PatchGrid g = check_hardness_args(x, patch_h, patch_w);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({g.B, g.Nh, g.Nw}, x.options());
  check_launch(hardness_forward(dtype_of(x), patch_shape(g), xc.data_ptr(), out.data_ptr(),
                                from_logits, eps, c10::cuda::getCurrentCUDAStream()),
               "patch_entropy_hardness_forward");
  return out;
}

at::Tensor hardness_backward_cuda(const at::Tensor& grad, const at::Tensor& x, int64_t patch_h,
                                  int64_t patch_w, bool from_logits, double eps) {
  const PatchGrid g = check_hardness_args(x, patch_h, patch_w);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({g.B, g.Nh, g.Nw}), "grad must be (B, Nh, Nw)");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), gc = grad.contiguous().to(x.scalar_type());
  at::Tensor dx = at::empty({g.B, g.K, g.H, g.W}, x.options());
  check_launch(
      hardness_backward(dtype_of(x), patch_shape(g), gc.data_ptr(), xc.data_ptr(), dx.data_ptr(),
                        from_logits, eps, c10::cuda::getCurrentCUDAStream()),
      "patch_entropy_hardness_backward");
  return dx;
}

std::vector<at::Tensor> patch_cutmix_cuda(at::TensorList tensors, const at::Tensor& patch_mask) {
  const PatchGrid g = check_cutmix_args(tensors, patch_mask);
  const c10::cuda::CUDAGuard guard(patch_mask.device());
  const at::Tensor mask = patch_mask.contiguous();
  std::vector<at::Tensor> src, dst;
  for (const at::Tensor& t : tensors) {
    src.push_back(t.contiguous());
    dst.push_back(at::empty(t.sizes(), t.options()));
  }
  for (size_t first = 0; first < src.size(); first += kCutmixBatch) {
    CutmixBatch batch{};
    batch.count = static_cast<int>(std::min<size_t>(kCutmixBatch, src.size() - first));
    for (int t = 0; t < batch.count; ++t)
      batch.t[t] = {src[first + t].data_ptr(), dst[first + t].data_ptr(), src[first + t].numel(),
                    static_cast<int>(src[first + t].element_size())};
    check_launch(patch_cutmix(batch, mask.data_ptr<bool>(), patch_shape(g),
                              c10::cuda::getCurrentCUDAStream()),
                 "patch_cutmix");
  }
  return dst;
}

// int64 label tensors as the launchers' 64-bit `long long` (int64_t is `long` on Linux).
const long long* labels(const at::Tensor& t) { return static_cast<const long long*>(t.data_ptr()); }

void lse_update_cuda(const at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                     at::Tensor& m, at::Tensor& s, double inv_tau) {
  check_launch(contrastive_lse_update(dtype_of(sim), sim.data_ptr(), sim.size(0), sim.size(1),
                                      labels(ya), labels(yn), m.data_ptr(), s.data_ptr(), inv_tau,
                                      c10::cuda::getCurrentCUDAStream()),
               "memory_contrastive lse tile");
}

void grad_tile_cuda(at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                    const at::Tensor& lse, const at::Tensor& coef, double inv_tau) {
  check_launch(contrastive_grad_tile(dtype_of(sim), sim.data_ptr(), sim.size(0), sim.size(1),
                                     labels(ya), labels(yn), lse.data_ptr(), coef.data_ptr(),
                                     inv_tau, c10::cuda::getCurrentCUDAStream()),
               "memory_contrastive gradient tile");
}

constexpr ContrastiveTiles kCudaTiles{&lse_update_cuda, &grad_tile_cuda, 8192};

at::Tensor wide(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? t : t.to(at::kFloat);
}

std::tuple<at::Tensor, at::Tensor> contrastive_forward_cuda(
    const at::Tensor& anchors, const at::Tensor& anchor_labels, const at::Tensor& negatives,
    const at::Tensor& negative_labels, const at::Tensor& positives, const at::Tensor& has_positive,
    double temperature) {
  const c10::cuda::CUDAGuard guard(anchors.device());
  auto [loss, lse] =
      contrastive_forward(kCudaTiles, wide(anchors), anchor_labels, wide(negatives),
                          negative_labels, wide(positives), has_positive, temperature);
  return {loss.to(anchors.scalar_type()), lse.to(anchors.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> contrastive_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& anchors, const at::Tensor& anchor_labels,
    const at::Tensor& negatives, const at::Tensor& negative_labels, const at::Tensor& positives,
    const at::Tensor& has_positive, const at::Tensor& lse, double temperature,
    bool need_grad_negatives) {
  const c10::cuda::CUDAGuard guard(anchors.device());
  auto [ga, gn] = contrastive_backward(kCudaTiles, wide(grad_loss), wide(anchors), anchor_labels,
                                       wide(negatives), negative_labels, wide(positives),
                                       has_positive, wide(lse), temperature, need_grad_negatives);
  return {ga.to(anchors.scalar_type()), gn.to(negatives.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CUDA, m) {
  m.impl("patch_entropy_hardness_forward", &hardness_forward_cuda);
  m.impl("patch_entropy_hardness_backward", &hardness_backward_cuda);
  m.impl("patch_cutmix", &patch_cutmix_cuda);
  m.impl("memory_contrastive_forward", &contrastive_forward_cuda);
  m.impl("memory_contrastive_backward", &contrastive_backward_cuda);
}

}  // namespace busseg::cuda
