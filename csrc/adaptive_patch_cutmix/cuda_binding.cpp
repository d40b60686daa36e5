// Tensor bindings of the busseg::cutmix_patch_mask and busseg::adaptive_patch_cutmix CUDA
// launchers: validate, make contiguous, launch on the current stream (the gather kCutmixBatch
// tensors per launch).
#include "common/cuda_binding.h"

#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "adaptive_patch_cutmix/checks.h"
#include "adaptive_patch_cutmix/cuda.h"

namespace busseg::cuda {
namespace {

at::Tensor cutmix_patch_mask_cuda(const at::Tensor& hardness, const at::Tensor& uniforms,
                                  int64_t shield_count, double low, double high) {
  const int64_t N = check_cutmix_patch_mask_args(hardness, uniforms, shield_count, low, high);
  const c10::cuda::CUDAGuard guard(hardness.device());
  const int64_t B = hardness.size(0);
  const at::Tensor h = hardness.contiguous(), u = uniforms.to(at::kFloat).contiguous();
  at::Tensor mask = at::empty(hardness.sizes(), hardness.options().dtype(at::kBool));
  at::Tensor scratch;
  if (const size_t bytes = cutmix_patch_mask_scratch_bytes(B, N); bytes > 0)
    scratch = at::empty({static_cast<int64_t>(bytes)}, hardness.options().dtype(at::kByte));
  check_launch(cutmix_patch_mask(dtype_of(h), B, N, h.data_ptr(), u.data_ptr<float>(), shield_count,
                                 low, high, scratch.defined() ? scratch.data_ptr() : nullptr,
                                 mask.data_ptr<bool>(), c10::cuda::getCurrentCUDAStream()),
               "cutmix_patch_mask");
  return mask;
}

std::vector<at::Tensor> adaptive_patch_cutmix_cuda(at::TensorList tensors,
                                                   const at::Tensor& patch_mask) {
  const PatchGrid g = check_adaptive_patch_cutmix_args(tensors, patch_mask);
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
    check_launch(adaptive_patch_cutmix(batch, mask.data_ptr<bool>(), patch_shape(g),
                                       c10::cuda::getCurrentCUDAStream()),
                 "adaptive_patch_cutmix");
  }
  return dst;
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CUDA, m) {
  m.impl("cutmix_patch_mask", &cutmix_patch_mask_cuda);
  m.impl("adaptive_patch_cutmix", &adaptive_patch_cutmix_cuda);
}

}  // namespace busseg::cuda
