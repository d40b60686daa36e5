// busseg::patch_entropy_hardness (PH-Net Eq. 4; docs/ops.md), C++/OpenMP CPU kernels.
//
// One pass over the probabilities (or logits, softmax fused), a thread per row of patches, each
// image row's pixel entropies computed with `omp simd` over x and summed per column over the patch
// row, then per patch; two classes from logits take one fused loop with a single exp per pixel.
#include "common/cpu.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/fast_math.h"
#include "patch_entropy_hardness/checks.h"

namespace busseg {
namespace {

// x[i] = exp(x[i])
template <typename T>
BUSSEG_SIMD_CLONES void exp_inplace(T* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = exp_of(x[i]);
}

// ent[i] += p[i] * log(p[i] + eps)
template <typename T>
BUSSEG_SIMD_CLONES void add_p_log_p(const T* p, T eps, T* ent, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) ent[i] += p[i] * log_of(p[i] + eps);
}

// ent[i] += Σ_k p_k · log(p_k + eps) for two classes given as logits, in one pass: with
// m = max(x0, x1) one of x0 − m, x1 − m is 0 and their sum t = −|x1 − x0|, so the softmax is
// 1 / (1 + e^t) and e^t / (1 + e^t): one exp, no scratch rows. Non-finite logits give NaN
// through x − m, as in the reference softmax. Narrow logits are widened to the accumulator type.
template <typename scalar_t, typename T>
BUSSEG_SIMD_CLONES void add_binary_entropy(const scalar_t* x0, const scalar_t* x1, T eps, T* ent,
                                           int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T a = T(x0[i]), b = T(x1[i]);
    const T m = std::max(a, b);
    const T e = exp_of((a - m) + (b - m));
    const T hi = T(1) / (T(1) + e), lo = e * hi;
    ent[i] += hi * log_of(hi + eps) + lo * log_of(lo + eps);
  }
}

// Per-pixel class probabilities of one image row, (K, W) with stride HW between classes:
// p[k*W + x]. From logits the softmax is taken here.
template <typename scalar_t, typename acc_t>
void row_probabilities(const scalar_t* x, int64_t K, int64_t W, int64_t HW, bool from_logits,
                       acc_t* p, acc_t* scratch) {
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* xk = x + k * HW;
    acc_t* pk = p + k * W;
#pragma omp simd
    for (int64_t i = 0; i < W; ++i) pk[i] = acc_t(xk[i]);
  }
  if (!from_logits) return;
  acc_t* mx = scratch;
  acc_t* sum = scratch + W;
  for (int64_t i = 0; i < W; ++i) mx[i] = p[i], sum[i] = 0;
  for (int64_t k = 1; k < K; ++k)
#pragma omp simd
    for (int64_t i = 0; i < W; ++i) mx[i] = std::max(mx[i], p[k * W + i]);
  for (int64_t k = 0; k < K; ++k)
#pragma omp simd
    for (int64_t i = 0; i < W; ++i) p[k * W + i] -= mx[i];
  exp_inplace(p, K * W);
  for (int64_t k = 0; k < K; ++k)
#pragma omp simd
    for (int64_t i = 0; i < W; ++i) sum[i] += p[k * W + i];
  for (int64_t k = 0; k < K; ++k)
#pragma omp simd
    for (int64_t i = 0; i < W; ++i) p[k * W + i] /= sum[i];
}

template <typename scalar_t>
void hardness_forward_kernel(const scalar_t* x, scalar_t* out, const PatchGrid& g, bool from_logits,
                             double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = g.H * g.W;
  const acc_t scale = acc_t(-1.0 / (std::log(double(g.K)) * g.ph * g.pw));
  const bool binary = from_logits && g.K == 2;
  // A thread per row of patches; ent sums each column's pixel entropies over the row's ph lines.
  at::parallel_for(0, g.B * g.Nh, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(binary ? 0 : g.K * g.W), scratch(binary ? 0 : 2 * g.W), ent(g.W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.Nh, i = r % g.Nh;
      std::fill(ent.begin(), ent.end(), acc_t(0));
      for (int64_t y = i * g.ph; y < (i + 1) * g.ph; ++y) {
        const scalar_t* xr = x + b * g.K * HW + y * g.W;
        if (binary) {
          add_binary_entropy(xr, xr + HW, acc_t(eps), ent.data(), g.W);
          continue;
        }
        row_probabilities(xr, g.K, g.W, HW, from_logits, p.data(), scratch.data());
        for (int64_t k = 0; k < g.K; ++k)
          add_p_log_p(p.data() + k * g.W, acc_t(eps), ent.data(), g.W);
      }
      for (int64_t j = 0; j < g.Nw; ++j) {
        acc_t acc = 0;
        for (int64_t c = j * g.pw; c < (j + 1) * g.pw; ++c) acc += ent[c];
        out[r * g.Nw + j] = scalar_t(scale * acc);
      }
    }
  });
}

template <typename scalar_t>
void hardness_backward_kernel(const scalar_t* grad, const scalar_t* x, scalar_t* dx,
                              const PatchGrid& g, bool from_logits, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = g.H * g.W;
  const acc_t scale = acc_t(-1.0 / (std::log(double(g.K)) * g.ph * g.pw));
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(g.K * g.W), pdp(g.K * g.W), scratch(2 * g.W), c(g.W), dot(g.W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.H, y = r % g.H;
      scalar_t* dr = dx + b * g.K * HW + y * g.W;
      row_probabilities(x + b * g.K * HW + y * g.W, g.K, g.W, HW, from_logits, p.data(),
                        scratch.data());
      const scalar_t* gr = grad + (b * g.Nh + y / g.ph) * g.Nw;
      for (int64_t i = 0; i < g.W; ++i) c[i] = scale * acc_t(gr[i / g.pw]), dot[i] = 0;
      // dr/dp_k = scale · (log(p_k + eps) + p_k / (p_k + eps))
      for (int64_t k = 0; k < g.K; ++k) {
        const acc_t* pk = p.data() + k * g.W;
        acc_t* qk = pdp.data() + k * g.W;
#pragma omp simd
        for (int64_t i = 0; i < g.W; ++i) {
          const acc_t q = pk[i] + acc_t(eps);
          qk[i] = c[i] * (std::log(q) + pk[i] / q);
        }
      }
      if (!from_logits) {
        for (int64_t k = 0; k < g.K; ++k)
          for (int64_t i = 0; i < g.W; ++i) dr[k * HW + i] = scalar_t(pdp[k * g.W + i]);
        continue;
      }
      // softmax backward: dx_k = p_k · (dp_k − Σ_j p_j dp_j)
      for (int64_t k = 0; k < g.K; ++k)
#pragma omp simd
        for (int64_t i = 0; i < g.W; ++i) dot[i] += p[k * g.W + i] * pdp[k * g.W + i];
      for (int64_t k = 0; k < g.K; ++k)
#pragma omp simd
        for (int64_t i = 0; i < g.W; ++i)
          dr[k * HW + i] = scalar_t(p[k * g.W + i] * (pdp[k * g.W + i] - dot[i]));
    }
  });
}

at::Tensor patch_entropy_hardness_cpu(const at::Tensor& x, int64_t patch_h, int64_t patch_w,
                                      bool from_logits, double eps) {
  const PatchGrid g = check_patch_entropy_hardness_args(x, patch_h, patch_w);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({g.B, g.Nh, g.Nw}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "patch_entropy_hardness_cpu", [&] {
        hardness_forward_kernel<scalar_t>(xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g,
                                          from_logits, eps);
      });
  return out;
}

at::Tensor patch_entropy_hardness_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                               int64_t patch_h, int64_t patch_w, bool from_logits,
                                               double eps) {
  const PatchGrid g = check_patch_entropy_hardness_backward_args(grad, x, patch_h, patch_w);
  const at::Tensor xc = x.contiguous(), gc = grad.contiguous().to(x.scalar_type());
  at::Tensor dx = at::empty({g.B, g.K, g.H, g.W}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "patch_entropy_hardness_backward_cpu", [&] {
        hardness_backward_kernel<scalar_t>(gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                                           dx.data_ptr<scalar_t>(), g, from_logits, eps);
      });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CPU, m) {
  m.impl("patch_entropy_hardness", &patch_entropy_hardness_cpu);
  m.impl("patch_entropy_hardness_backward", &patch_entropy_hardness_backward_cpu);
}

}  // namespace busseg
