// Tensor binding of the busseg::cross_layer_alignment_loss CUDA launchers: the blocked driver
// (common/cra_driver.h) with the fused row kernels of cuda.cu; the products are cuBLAS's (at::bmm,
// in the precision PyTorch's matmuls use: float32 in TF32 when allowed, half and bfloat16 on tensor
// cores), half and bfloat16 logits written in float32 (bmm.dtype) so that the row kernels read
// them unrounded.
#include "common/cuda_binding.h"

#include <torch/library.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "common/cra_driver.h"
#include "cross_layer_alignment_loss/checks.h"
#include "cross_layer_alignment_loss/cuda.h"

namespace busseg::cuda {
namespace {

AlignShape align_shape(const at::Tensor& logits) {
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
                   dtype_of(logits), dtype_of(grad), s, grad_loss.data_ptr(), logits.data_ptr(),
                   lse.data_ptr(), eps, norm, grad.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "cross_layer_alignment_loss_rows_backward");
}

// Half and bfloat16 inputs: float32 logits (cuBLAS accumulates in float32 either way).
at::ScalarType logits_type(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 ? at::kFloat : dtype;
}

// The driver's products, the logits written in their block's dtype.
class CudaProducts : public AlignProducts {
 public:
  using AlignProducts::AlignProducts;
  void logits(int64_t r0, int64_t n, at::Tensor& z) override {
    for (size_t l = 0; l < feats_.size(); ++l) {
      at::Tensor out = z.select(0, static_cast<int64_t>(l));
      const at::Tensor f = feats_[l].narrow(2, r0, n).transpose(1, 2),
                       p = proxies_[l].transpose(1, 2);
      if (f.scalar_type() == out.scalar_type())
        at::bmm_out(out, f, p);
      else
        at::bmm_out(out, f, p, out.scalar_type());
    }
  }
};

std::unique_ptr<AlignProducts> cuda_products(at::TensorList feats, at::TensorList proxies) {
  return std::make_unique<CudaProducts>(feats, proxies);
}

constexpr AlignKernels kCudaKernels{&rows_forward_cuda, &rows_backward_cuda, &cuda_products,
                                    &logits_type};

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
