// Tensor binding of the busseg::cross_layer_alignment_loss CUDA launchers: the blocked driver
// (common/cra_driver.h) with the fused row kernels of cuda.cu; the products are cuBLAS's
// (at::bmm).
#include "common/cuda_binding.h"

#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "common/cra_driver.h"
#include "cross_layer_alignment_loss/checks.h"
#include "cross_layer_alignment_loss/cuda.h"

namespace busseg::cuda {
namespace {

AlignShape align_shape(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.size(0) <= kMaxAlignLayers, "the CUDA alignment loss handles at most ",
                    kMaxAlignLayers, " layers, got ", logits.size(0));
  return {static_cast<int>(logits.size(0)), logits.size(1), logits.size(2)};
}

at::Tensor rows_forward_cuda(const at::Tensor& logits, double eps, at::Tensor& lse) {
  const AlignShape s = align_shape(logits);
  at::Tensor row_loss = at::empty({s.R}, lse.options());
  check_launch(
      cross_layer_alignment_loss_rows(dtype_of(logits), s, logits.data_ptr(), eps, lse.data_ptr(),
                                      row_loss.data_ptr(), c10::cuda::getCurrentCUDAStream()),
      "cross_layer_alignment_loss_rows");
  return row_loss.sum();
}

void rows_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                        const at::Tensor& lse, double eps, double norm, at::Tensor& grad) {
  const AlignShape s = align_shape(logits);
  check_launch(cross_layer_alignment_loss_rows_backward(
                   dtype_of(logits), s, grad_loss.data_ptr(), logits.data_ptr(), lse.data_ptr(),
                   eps, norm, grad.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "cross_layer_alignment_loss_rows_backward");
}

constexpr AlignKernels kCudaKernels{&rows_forward_cuda, &rows_backward_cuda, nullptr};

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> cross_layer_alignment_loss_cuda(
    at::TensorList feats, at::TensorList proxies, c10::string_view reduction, double eps,
    int64_t block_rows, bool grad_proxies) {
  check_cross_layer_alignment_loss_args(feats, proxies, std::string(reduction), eps, block_rows);
  const c10::cuda::CUDAGuard guard(feats[0].device());
  return align_blocked_forward(kCudaKernels, feats, proxies, std::string(reduction), eps,
                               block_rows, grad_proxies);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>
cross_layer_alignment_loss_backward_cuda(const at::Tensor& grad_loss, at::TensorList feats,
                                         at::TensorList proxies, const at::Tensor& lse,
                                         c10::string_view reduction, double eps, int64_t block_rows,
                                         bool need_grad_feats, bool need_grad_proxies) {
  check_cross_layer_alignment_loss_backward_args(grad_loss, feats, proxies, lse,
                                                 std::string(reduction), eps, block_rows);
  const c10::cuda::CUDAGuard guard(feats[0].device());
  return align_blocked_backward(kCudaKernels, grad_loss, feats, proxies, lse,
                                std::string(reduction), eps, block_rows, need_grad_feats,
                                need_grad_proxies);
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CUDA, m) {
  m.impl("cross_layer_alignment_loss", &cross_layer_alignment_loss_cuda);
  m.impl("cross_layer_alignment_loss_backward", &cross_layer_alignment_loss_backward_cuda);
}

}  // namespace busseg::cuda
