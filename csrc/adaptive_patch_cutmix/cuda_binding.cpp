// Tensor binding of the busseg::adaptive_patch_cutmix CUDA launcher: validate, make contiguous,
// launch on the current stream, kCutmixBatch tensors per launch.
#include "common/cuda_binding.h"

#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "adaptive_patch_cutmix/checks.h"
#include "adaptive_patch_cutmix/cuda.h"

namespace busseg::cuda {
namespace {

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
  m.impl("adaptive_patch_cutmix", &adaptive_patch_cutmix_cuda);
}

}  // namespace busseg::cuda
