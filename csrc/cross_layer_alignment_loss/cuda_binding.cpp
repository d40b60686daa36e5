// Tensor binding of the CRA CUDA launchers: validate, lay out, allocate scratch, launch on the
// current stream.
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "cra_checks.h"
#include "cra_driver.h"
#include "cuda/binding.h"
#include "cuda/cra.h"

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
  check_launch(cra_greedy_blocks_per_image(dtype, B, HW, C, &blocks),
               "cra_greedy_blocks_per_image");
  return blocks;
}

at::Tensor cra_greedy_sampling_cuda(const at::Tensor& feat, const at::Tensor& first,
                                    int64_t num_proxies, double scale) {
  check_greedy_args(feat, first, num_proxies);
  const c10::cuda::CUDAGuard guard(feat.device());
  const int64_t B = feat.size(0), C = feat.size(1), HW = feat.size(2) * feat.size(3);
  const DType dtype = dtype_of(feat);
  const at::Tensor f = feat.permute({0, 2, 3, 1}).contiguous();  // (B, HW, C)
  const at::Tensor s0 = first.contiguous();
  at::Tensor idx = at::empty({B, num_proxies}, first.options());
  const int64_t blocks = greedy_blocks_per_image(dtype, B, HW, C);
  const auto bytes = static_cast<int64_t>(cra_greedy_workspace_bytes(dtype, B, HW, blocks));
  at::Tensor workspace = at::empty({bytes}, feat.options().dtype(at::kByte));
  check_launch(cra_greedy_sampling(dtype, B, HW, C, num_proxies, blocks, f.data_ptr(),
                                   reinterpret_cast<const long long*>(s0.data_ptr<int64_t>()),
                                   scale, workspace.data_ptr(),
                                   reinterpret_cast<long long*>(idx.data_ptr<int64_t>()),
                                   c10::cuda::getCurrentCUDAStream()),
               "cra_greedy_sampling");
  return idx;
}

// AlignKernels for CUDA (cra_driver.h): the fused row kernels on a contiguous block; the products
// are cuBLAS's (at::bmm).
AlignShape align_shape(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.size(0) <= kMaxAlignLayers, "the CUDA alignment loss handles at most ",
                    kMaxAlignLayers, " layers, got ", logits.size(0));
  return {static_cast<int>(logits.size(0)), logits.size(1), logits.size(2)};
}

at::Tensor rows_forward_cuda(const at::Tensor& logits, double eps, at::Tensor& lse) {
  const AlignShape s = align_shape(logits);
  at::Tensor row_loss = at::empty({s.R}, lse.options());
  check_launch(cra_align_forward(dtype_of(logits), s, logits.data_ptr(), eps, lse.data_ptr(),
                                 row_loss.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "cra_align_forward");
  return row_loss.sum();
}

void rows_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                        const at::Tensor& lse, double eps, double norm, at::Tensor& grad) {
  const AlignShape s = align_shape(logits);
  check_launch(cra_align_backward(dtype_of(logits), s, grad_loss.data_ptr(), logits.data_ptr(),
                                  lse.data_ptr(), eps, norm, grad.data_ptr(),
                                  c10::cuda::getCurrentCUDAStream()),
               "cra_align_backward");
}

constexpr AlignKernels kCudaKernels{&rows_forward_cuda, &rows_backward_cuda, nullptr};

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> cra_align_blocked_forward_cuda(
    at::TensorList feats, at::TensorList proxies, c10::string_view reduction, double eps,
    int64_t block_rows, bool grad_proxies) {
  TORCH_CHECK_VALUE(!feats.empty(), "feats must hold L >= 2 layers, got 0");
  const c10::cuda::CUDAGuard guard(feats[0].device());
  return align_blocked_forward(kCudaKernels, feats, proxies, std::string(reduction), eps,
                               block_rows, grad_proxies);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> cra_align_blocked_backward_cuda(
    const at::Tensor& grad_loss, at::TensorList feats, at::TensorList proxies,
    const at::Tensor& lse, c10::string_view reduction, double eps, int64_t block_rows,
    bool need_grad_feats, bool need_grad_proxies) {
  TORCH_CHECK_VALUE(!feats.empty(), "feats must hold L >= 2 layers, got 0");
  const c10::cuda::CUDAGuard guard(feats[0].device());
  return align_blocked_backward(kCudaKernels, grad_loss, feats, proxies, lse,
                                std::string(reduction), eps, block_rows, need_grad_feats,
                                need_grad_proxies);
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CUDA, m) {
  m.impl("cra_greedy_sampling", &cra_greedy_sampling_cuda);
  m.impl("cra_align_blocked_forward", &cra_align_blocked_forward_cuda);
  m.impl("cra_align_blocked_backward", &cra_align_blocked_backward_cuda);
}

}  // namespace busseg::cuda
