// Tensor binding of the busseg::memory_contrastive_loss CUDA launchers: the shared tiled driver
// (common/contrastive_driver.h) with cuBLAS tiles and the tile kernels of cuda.cu; half/bfloat16
// inputs are computed in float32 and the gradients cast back.
#include "common/cuda_binding.h"

#include <torch/library.h>

#include <tuple>

#include "common/contrastive_driver.h"
#include "memory_contrastive_loss/checks.h"
#include "memory_contrastive_loss/cuda.h"

namespace busseg::cuda {
namespace {

// int64 label tensors as the launchers' 64-bit `long long` (int64_t is `long` on Linux).
const long long* labels(const at::Tensor& t) { return static_cast<const long long*>(t.data_ptr()); }

void lse_update_cuda(const at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                     at::Tensor& m, at::Tensor& s, double inv_tau) {
  check_launch(memory_contrastive_loss_lse_update(
                   dtype_of(sim), sim.data_ptr(), sim.size(0), sim.size(1), labels(ya), labels(yn),
                   m.data_ptr(), s.data_ptr(), inv_tau, c10::cuda::getCurrentCUDAStream()),
               "memory_contrastive lse tile");
}

void grad_tile_cuda(at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                    const at::Tensor& lse, const at::Tensor& coef, double inv_tau) {
  check_launch(memory_contrastive_loss_grad_tile(
                   dtype_of(sim), sim.data_ptr(), sim.size(0), sim.size(1), labels(ya), labels(yn),
                   lse.data_ptr(), coef.data_ptr(), inv_tau, c10::cuda::getCurrentCUDAStream()),
               "memory_contrastive gradient tile");
}

constexpr ContrastiveTiles kCudaTiles{&lse_update_cuda, &grad_tile_cuda, 8192};

at::Tensor wide(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? t : t.to(at::kFloat);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> memory_contrastive_loss_cuda(
    const at::Tensor& anchors, const at::Tensor& anchor_labels, const at::Tensor& negatives,
    const at::Tensor& negative_labels, const at::Tensor& positives, const at::Tensor& has_positive,
    double temperature, bool save_weighted_negatives) {
  check_memory_contrastive_loss_args(anchors, anchor_labels, negatives, negative_labels, positives,
                                     has_positive, temperature);
  const c10::cuda::CUDAGuard guard(anchors.device());
  auto [loss, lse, wn] = contrastive_forward(kCudaTiles, wide(anchors), anchor_labels,
                                             wide(negatives), negative_labels, wide(positives),
                                             has_positive, temperature, save_weighted_negatives);
  const at::ScalarType dtype = anchors.scalar_type();
  return {loss.to(dtype), lse.to(dtype), wn.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor> memory_contrastive_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& anchors, const at::Tensor& anchor_labels,
    const at::Tensor& negatives, const at::Tensor& negative_labels, const at::Tensor& positives,
    const at::Tensor& has_positive, const at::Tensor& lse, const at::Tensor& weighted_negatives,
    double temperature, bool need_grad_negatives) {
  check_memory_contrastive_loss_backward_args(grad_loss, anchors, anchor_labels, negatives,
                                              negative_labels, positives, has_positive, lse,
                                              weighted_negatives, temperature);
  const c10::cuda::CUDAGuard guard(anchors.device());
  auto [ga, gn] =
      contrastive_backward(kCudaTiles, wide(grad_loss), wide(anchors), anchor_labels,
                           wide(negatives), negative_labels, wide(positives), has_positive,
                           wide(lse), wide(weighted_negatives), temperature, need_grad_negatives);
  return {ga.to(anchors.scalar_type()), gn.to(negatives.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CUDA, m) {
  m.impl("memory_contrastive_loss", &memory_contrastive_loss_cuda);
  m.impl("memory_contrastive_loss_backward", &memory_contrastive_loss_backward_cuda);
}

}  // namespace busseg::cuda
