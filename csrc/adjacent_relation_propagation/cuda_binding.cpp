// Tensor binding of the busseg::adjacent_relation_propagation CUDA launchers: validate, allocate,
// launch on the current stream. The kernels read NCHW directly: an input in another layout
// (channels-last, strided) is made contiguous, one that already is costs nothing.
#include "common/cuda_binding.h"

#include <torch/library.h>

#include "adjacent_relation_propagation/checks.h"
#include "adjacent_relation_propagation/cuda.h"

namespace busseg::cuda {
namespace {

ArpShape shape_of(const at::Tensor& feat, const at::Tensor& value, int64_t kernel_size,
                  int64_t dilation, bool valid_padding) {
  return {feat.size(0),
          feat.size(1),
          value.size(1),
          feat.size(2),
          feat.size(3),
          static_cast<int>(kernel_size),
          static_cast<int>(dilation),
          valid_padding};
}

// `bytes` of device memory for a launcher's scratch, or an empty tensor (null data) for none.
at::Tensor scratch(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void* data_or_null(const at::Tensor& t) { return t.numel() > 0 ? t.data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor> adjacent_relation_propagation_cuda(
    const at::Tensor& feat, const at::Tensor& value, int64_t kernel_size, int64_t dilation,
    double scale, bool valid_padding) {
  check_adjacent_relation_propagation_args(feat, value, kernel_size, dilation);
  const c10::cuda::CUDAGuard guard(feat.device());
  const ArpShape s = shape_of(feat, value, kernel_size, dilation, valid_padding);
  const at::Tensor f = feat.contiguous(), v = value.contiguous();
  at::Tensor out = at::empty({s.B, s.K, s.H, s.W}, feat.options());
  at::Tensor weights = at::empty({s.B, kernel_size * kernel_size, s.H, s.W}, feat.options());
  const at::Tensor work = scratch(adjacent_relation_propagation_scratch_bytes(dtype_of(f), s), f);
  check_launch(adjacent_relation_propagation(dtype_of(f), s, f.data_ptr(), v.data_ptr(),
                                             out.data_ptr(), weights.data_ptr(), data_or_null(work),
                                             scale, c10::cuda::getCurrentCUDAStream()),
               "adjacent_relation_propagation");
  return {out, weights};
}

std::tuple<at::Tensor, at::Tensor> adjacent_relation_propagation_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& feat, const at::Tensor& value,
    const at::Tensor& weights, int64_t kernel_size, int64_t dilation, double scale,
    bool valid_padding, bool need_grad_feat, bool need_grad_value) {
  check_adjacent_relation_propagation_backward_args(grad_out, feat, value, weights, kernel_size,
                                                    dilation);
  const c10::cuda::CUDAGuard guard(feat.device());
  const ArpShape s = shape_of(feat, value, kernel_size, dilation, valid_padding);
  const at::Tensor f = feat.contiguous(), v = value.contiguous();
  const at::Tensor go = grad_out.contiguous(), w = weights.contiguous();
  at::Tensor grad_feat = need_grad_feat ? at::empty({s.B, s.C, s.H, s.W}, feat.options())
                                        : at::empty({0}, feat.options());
  at::Tensor grad_value = need_grad_value ? at::empty({s.B, s.K, s.H, s.W}, value.options())
                                          : at::empty({0}, value.options());
  const at::Tensor work = scratch(
      adjacent_relation_propagation_backward_scratch_bytes(dtype_of(f), s, need_grad_feat), f);
  check_launch(adjacent_relation_propagation_backward(
                   dtype_of(f), s, go.data_ptr(), f.data_ptr(), v.data_ptr(), w.data_ptr(),
                   need_grad_feat ? grad_feat.data_ptr() : nullptr,
                   need_grad_value ? grad_value.data_ptr() : nullptr, data_or_null(work), scale,
                   c10::cuda::getCurrentCUDAStream()),
               "adjacent_relation_propagation_backward");
  return {grad_feat, grad_value};
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CUDA, m) {
  m.impl("adjacent_relation_propagation", &adjacent_relation_propagation_cuda);
  m.impl("adjacent_relation_propagation_backward", &adjacent_relation_propagation_backward_cuda);
}

}  // namespace busseg::cuda
