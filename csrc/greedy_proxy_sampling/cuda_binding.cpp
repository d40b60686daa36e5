// Tensor binding of the busseg::greedy_proxy_sampling CUDA launchers: validate, lay out, allocate
// scratch, launch on the current stream.
#include "common/cuda_binding.h"

#include <torch/library.h>

#include <cstdlib>

#include "greedy_proxy_sampling/checks.h"
#include "greedy_proxy_sampling/cuda.h"

namespace busseg::cuda {
namespace {

// BUSSEG_GREEDY_BLOCKS_PER_IMAGE forces the greedy kernel's split (tests, tuning): 1 = one block
// per image, n >= 2 = n cooperating blocks (at most H*W); unset or 0 = the launcher's choice.
int64_t greedy_blocks_per_image(DType dtype, int64_t B, int64_t HW, int64_t C) {
  const char* env = std::getenv("BUSSEG_GREEDY_BLOCKS_PER_IMAGE");
  char* end = nullptr;
  const long long forced = env == nullptr ? 0 : std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(env == nullptr || (end != env && *end == '\0' && forced >= 0 && forced <= HW),
                    "BUSSEG_GREEDY_BLOCKS_PER_IMAGE must be a count in [0, H*W = ", HW, "], got '",
                    env, "'");
  if (forced > 0) return forced;
  long long blocks = 1;
  check_launch(greedy_proxy_sampling_blocks_per_image(dtype, B, HW, C, &blocks),
               "greedy_proxy_sampling_blocks_per_image");
  return blocks;
}

at::Tensor greedy_proxy_sampling_cuda(const at::Tensor& feat, const at::Tensor& first,
                                      int64_t num_proxies, double scale) {
  check_greedy_proxy_sampling_args(feat, first, num_proxies);
  const c10::cuda::CUDAGuard guard(feat.device());
  const int64_t B = feat.size(0), C = feat.size(1), HW = feat.size(2) * feat.size(3);
  const DType dtype = dtype_of(feat);
  const at::Tensor f = feat.permute({0, 2, 3, 1}).contiguous();  // (B, HW, C)
  const at::Tensor s0 = first.contiguous();
  at::Tensor idx = at::empty({B, num_proxies}, first.options());
  const int64_t blocks = greedy_blocks_per_image(dtype, B, HW, C);
  const auto bytes =
      static_cast<int64_t>(greedy_proxy_sampling_workspace_bytes(dtype, B, HW, blocks));
  at::Tensor workspace = at::empty({bytes}, feat.options().dtype(at::kByte));
  check_launch(greedy_proxy_sampling(dtype, B, HW, C, num_proxies, blocks, f.data_ptr(),
                                     reinterpret_cast<const long long*>(s0.data_ptr<int64_t>()),
                                     scale, workspace.data_ptr(),
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
