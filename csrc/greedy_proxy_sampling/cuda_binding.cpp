// Tensor binding of the busseg::greedy_proxy_sampling CUDA launcher: validate, plan, allocate
// the plan's workspace, launch on the current stream. The features are read as stored (NCHW).
#include "common/cuda_binding.h"

#include <torch/library.h>

#include "greedy_proxy_sampling/checks.h"
#include "greedy_proxy_sampling/cuda.h"

namespace busseg::cuda {
namespace {

at::Tensor greedy_proxy_sampling_cuda(const at::Tensor& feat, const at::Tensor& first,
                                      int64_t num_proxies, double scale) {
  check_greedy_proxy_sampling_args(feat, first, num_proxies);
  const c10::cuda::CUDAGuard guard(feat.device());
  const int64_t B = feat.size(0), C = feat.size(1), HW = feat.size(2) * feat.size(3);
  TORCH_CHECK_VALUE(HW <= INT32_MAX && C <= INT32_MAX,
                    "feat must have fewer than 2^31 pixels and channels per image, got ",
                    feat.sizes());
  const DType dtype = dtype_of(feat);
  GreedyPlan plan;
  check_launch(greedy_proxy_sampling_plan(dtype, B, HW, C, &plan), "greedy_proxy_sampling_plan");
  TORCH_CHECK_VALUE(plan.unsupported == nullptr, "feat ", feat.sizes(), ": ", plan.unsupported);
  const at::Tensor f = feat.contiguous();
  const at::Tensor s0 = first.contiguous();
  at::Tensor idx = at::empty({B, num_proxies}, first.options());
  at::Tensor workspace;
  if (plan.workspace_bytes > 0)
    workspace =
        at::zeros({static_cast<int64_t>(plan.workspace_bytes)}, feat.options().dtype(at::kByte));
  check_launch(greedy_proxy_sampling(dtype, plan, B, HW, C, num_proxies, f.data_ptr(),
                                     reinterpret_cast<const long long*>(s0.data_ptr<int64_t>()),
                                     scale, workspace.defined() ? workspace.data_ptr() : nullptr,
                                     reinterpret_cast<long long*>(idx.data_ptr<int64_t>()),
                                     c10::cuda::getCurrentCUDAStream()),
               "greedy_proxy_sampling");
  return idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CUDA, m) {
  m.impl("greedy_proxy_sampling", &greedy_proxy_sampling_cuda);
}

}  // namespace busseg::cuda
