// Tensor binding of the CRA CUDA launchers: validate, lay out, allocate scratch, launch on the
// current stream.
#include <torch/library.h>

#include <string>

#include "cra_checks.h"
#include "cuda/binding.h"
#include "cuda/cra.h"

namespace busseg::cuda {
namespace {

at::Tensor cra_greedy_sampling_cuda(const at::Tensor& feat, const at::Tensor& first,
                                    int64_t num_proxies, double scale) {
  check_greedy_args(feat, first, num_proxies);
  const c10::cuda::CUDAGuard guard(feat.device());
  const int64_t B = feat.size(0), C = feat.size(1), HW = feat.size(2) * feat.size(3);
  const at::Tensor f = feat.permute({0, 2, 3, 1}).contiguous();  // (B, HW, C)
  const at::Tensor s0 = first.contiguous();
  at::Tensor idx = at::empty({B, num_proxies}, first.options());
  at::Tensor acc = at::empty({2 * B * HW}, feat.options().dtype(accumulator_type(feat)));
  at::Tensor chosen = at::empty({B * HW}, feat.options().dtype(at::kByte));
  check_launch(cra_greedy_sampling(dtype_of(feat), B, HW, C, num_proxies, f.data_ptr(),
                                   reinterpret_cast<const long long*>(s0.data_ptr<int64_t>()),
                                   scale, acc.data_ptr(), chosen.data_ptr<uint8_t>(),
                                   reinterpret_cast<long long*>(idx.data_ptr<int64_t>()),
                                   c10::cuda::getCurrentCUDAStream()),
               "cra_greedy_sampling");
  return idx;
}

AlignShape align_shape(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.size(0) <= kMaxAlignLayers, "the CUDA alignment loss handles at most ",
                    kMaxAlignLayers, " layers, got ", logits.size(0));
  return {static_cast<int>(logits.size(0)), logits.size(1) * logits.size(2), logits.size(3)};
}

std::tuple<at::Tensor, at::Tensor> cra_align_forward_cuda(const at::Tensor& logits,
                                                          c10::string_view reduction, double eps) {
  const double norm = check_align_args(logits, std::string(reduction), eps);
  const c10::cuda::CUDAGuard guard(logits.device());
  const AlignShape s = align_shape(logits);
  const at::Tensor z = logits.contiguous();
  const auto acc = logits.options().dtype(accumulator_type(logits));
  at::Tensor lse = at::empty({s.L, logits.size(1), logits.size(2)}, acc);
  at::Tensor row_loss = at::empty({s.R}, acc);
  check_launch(cra_align_forward(dtype_of(logits), s, z.data_ptr(), eps, lse.data_ptr(),
                                 row_loss.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "cra_align_forward");
  return {(row_loss.sum() * norm).to(logits.scalar_type()), lse};
}

at::Tensor cra_align_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                   const at::Tensor& lse, c10::string_view reduction, double eps) {
  const double norm = check_align_args(logits, std::string(reduction), eps);
  check_lse(logits, lse);
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must be a scalar, got ", grad_loss.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const AlignShape s = align_shape(logits);
  const at::Tensor z = logits.contiguous();
  const at::Tensor g = grad_loss.to(logits.scalar_type()).contiguous();
  const at::Tensor stats = lse.to(accumulator_type(logits)).contiguous();
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  check_launch(cra_align_backward(dtype_of(logits), s, g.data_ptr(), z.data_ptr(), stats.data_ptr(),
                                  eps, norm, grad.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "cra_align_backward");
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CUDA, m) {
  m.impl("cra_greedy_sampling", &cra_greedy_sampling_cuda);
  m.impl("cra_align_forward", &cra_align_forward_cuda);
  m.impl("cra_align_backward", &cra_align_backward_cuda);
}

}  // namespace busseg::cuda
