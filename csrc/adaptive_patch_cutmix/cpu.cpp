// busseg::adaptive_patch_cutmix (PH-Net Eq. 5-7; docs/ops.md), C++/OpenMP CPU kernels. The mask:
// per image two sorts of the patch indices (the shield order, then the replacement order; see
// mask.h), images in parallel. The gather: one byte-level pass over every given tensor at once (a
// memcpy per run of patches from the same image, any dtype), the output bytes split evenly
// between threads.
#include "common/cpu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "adaptive_patch_cutmix/checks.h"
#include "adaptive_patch_cutmix/mask.h"

namespace busseg {
namespace {

// The mask of one image: hardness h and keys u (N each), the share's uniform u0.
template <typename scalar_t>
void patch_mask_image(const scalar_t* h, float u0, const float* u, int64_t N, int64_t k, double low,
                      double high, bool* mask) {
  std::vector<int64_t> order(N);
  std::vector<uint64_t> key(N);
  const auto sort_by_key = [&] {
    std::iota(order.begin(), order.end(), int64_t(0));
    std::sort(order.begin(), order.end(),
              [&](int64_t a, int64_t b) { return key[a] < key[b] || (key[a] == key[b] && a < b); });
  };
  for (int64_t i = 0; i < N; ++i) key[i] = cutmix::shield_key(static_cast<double>(h[i]));
  sort_by_key();
  std::fill(mask, mask + N, false);
  for (int64_t p = 0; p < k; ++p) mask[order[p]] = true;  // shielded, for the next keys
  for (int64_t i = 0; i < N; ++i) key[i] = cutmix::replace_key(mask[i], u[i]);
  sort_by_key();
  const int64_t n = cutmix::replaced_count(u0, low, high, N, k);
  std::fill(mask, mask + N, true);
  for (int64_t p = 0; p < n; ++p) mask[order[p]] = false;  // never a shielded one: n <= N - k
}

at::Tensor cutmix_patch_mask_cpu(const at::Tensor& hardness, const at::Tensor& uniforms,
                                 int64_t shield_count, double low, double high) {
  const int64_t N = check_cutmix_patch_mask_args(hardness, uniforms, shield_count, low, high);
  const int64_t B = hardness.size(0);
  const at::Tensor h = hardness.contiguous(), u = uniforms.to(at::kFloat).contiguous();
  at::Tensor mask = at::empty(hardness.sizes(), hardness.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "cutmix_patch_mask", [&] {
        const scalar_t* hp = h.const_data_ptr<scalar_t>();
        const float* up = u.const_data_ptr<float>();
        bool* mp = mask.data_ptr<bool>();
        at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b)
            patch_mask_image(hp + b * N, up[b * (N + 1)], up + b * (N + 1) + 1, N, shield_count,
                             low, high, mp + b * N);
        });
      });
  return mask;
}

// Every tensor viewed as (B, R, H, W) contiguous rows of W elements; out = mask ? own image :
// image (b+1) mod B. The threads split the output bytes evenly (a label row of int64 is twice an
// image row of float), so each first-touches an equal share of the fresh outputs; a row is
// copied in runs of neighbouring patches that come from the same image.
void cutmix_kernel(const std::vector<at::Tensor>& src, std::vector<at::Tensor>& dst,
                   const bool* mask, const PatchGrid& g) {
  std::vector<int64_t> first_byte(src.size() + 1, 0);
  for (size_t t = 0; t < src.size(); ++t) first_byte[t + 1] = first_byte[t] + src[t].nbytes();
  parallel_chunks(first_byte.back(), [&](int64_t begin, int64_t end) {
    for (size_t t = 0; t < src.size(); ++t) {
      const int64_t es = src[t].element_size(), row_bytes = g.W * es, seg = g.pw * es;
      const int64_t rows_per_image = src[t].numel() / (g.B * g.W);  // R * H
      // the rows of tensor t that start inside [begin, end)
      const auto first_row = [&](int64_t byte) {
        return std::clamp<int64_t>((byte - first_byte[t] + row_bytes - 1) / row_bytes, 0,
                                   g.B * rows_per_image);
      };
      for (int64_t row = first_row(begin); row < first_row(end); ++row) {
        const int64_t b = row / rows_per_image, y = row % g.H;
        const char* own = static_cast<const char*>(src[t].const_data_ptr()) + row * row_bytes;
        const char* other = own + (((b + 1) % g.B) - b) * rows_per_image * row_bytes;
        char* out = static_cast<char*>(dst[t].data_ptr()) + row * row_bytes;
        const bool* m = mask + (b * g.Nh + y / g.ph) * g.Nw;
        for (int64_t j = 0, j1; j < g.Nw; j = j1) {
          for (j1 = j + 1; j1 < g.Nw && m[j1] == m[j];) ++j1;
          std::memcpy(out + j * seg, (m[j] ? own : other) + j * seg, (j1 - j) * seg);
        }
      }
    }
  });
}

std::vector<at::Tensor> adaptive_patch_cutmix_cpu(at::TensorList tensors,
                                                  const at::Tensor& patch_mask) {
  const PatchGrid g = check_adaptive_patch_cutmix_args(tensors, patch_mask);
  std::vector<at::Tensor> src, dst;
  for (const at::Tensor& t : tensors) {
    src.push_back(t.contiguous());
    dst.push_back(at::empty(t.sizes(), t.options()));
  }
  const at::Tensor mask = patch_mask.contiguous();
  cutmix_kernel(src, dst, mask.data_ptr<bool>(), g);
  return dst;
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CPU, m) {
  m.impl("cutmix_patch_mask", &cutmix_patch_mask_cpu);
  m.impl("adaptive_patch_cutmix", &adaptive_patch_cutmix_cpu);
}

}  // namespace busseg
