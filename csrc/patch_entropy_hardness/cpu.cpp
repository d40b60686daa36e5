// PH-Net ops (SPEC §3, §4, §6), C++/OpenMP CPU kernels.
//
// Hardness: one pass over the probabilities (or logits, softmax fused), a thread per row of
// patches, each image row's pixel entropies computed with `omp simd` over x and summed per column
// over the patch row, then per patch; two classes from logits take one fused loop with a single
// exp per pixel. Cutmix: one byte-level gather over every given tensor at once (a memcpy per
// run of patches from the same image, any dtype), the output bytes split evenly between
// threads. Contrastive: the shared tiled driver with at::mm tiles and OpenMP tile kernels.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "contrastive_driver.h"
#include "cpu/common.h"
#include "cpu/fast_math.h"
#include "phnet_checks.h"

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
// through x − m, as in the reference softmax.
template <typename T>
BUSSEG_SIMD_CLONES void add_binary_entropy(const T* x0, const T* x1, T eps, T* ent, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T m = std::max(x0[i], x1[i]);
    const T e = exp_of((x0[i] - m) + (x1[i] - m));
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

// Contrastive tile kernels: rows of a (rows, cols) tile of dot products, a thread per block of
// rows.
template <typename scalar_t>
void lse_update_kernel(const at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                       at::Tensor& m, at::Tensor& s, double inv_tau) {
  const int64_t rows = sim.size(0), cols = sim.size(1);
  const scalar_t* S = sim.data_ptr<scalar_t>();
  const int64_t* la = ya.data_ptr<int64_t>();
  const int64_t* ln = yn.data_ptr<int64_t>();
  scalar_t* mp = m.data_ptr<scalar_t>();
  scalar_t* sp = s.data_ptr<scalar_t>();
  const scalar_t it = scalar_t(inv_tau), ninf = -std::numeric_limits<scalar_t>::infinity();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* Si = S + i * cols;
      const int64_t c = la[i];
      scalar_t mx = ninf;
      bool nan = false;
#pragma omp simd reduction(max : mx) reduction(| : nan)
      for (int64_t j = 0; j < cols; ++j) {
        const scalar_t v = ln[j] != c ? Si[j] * it : ninf;
        mx = std::max(mx, v);
        nan |= v != v;
      }
      const scalar_t m_new = nan ? std::numeric_limits<scalar_t>::quiet_NaN() : std::max(mp[i], mx);
      scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < cols; ++j)
        sum += ln[j] != c ? std::exp(Si[j] * it - m_new) : scalar_t(0);
      sp[i] = sp[i] * std::exp(mp[i] - m_new) + sum;
      mp[i] = m_new;
    }
  });
}

template <typename scalar_t>
void grad_tile_kernel(at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                      const at::Tensor& lse, const at::Tensor& coef, double inv_tau) {
  const int64_t rows = sim.size(0), cols = sim.size(1);
  scalar_t* S = sim.data_ptr<scalar_t>();
  const int64_t* la = ya.data_ptr<int64_t>();
  const int64_t* ln = yn.data_ptr<int64_t>();
  const scalar_t* l = lse.data_ptr<scalar_t>();
  const scalar_t* cf = coef.data_ptr<scalar_t>();
  const scalar_t it = scalar_t(inv_tau);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* Si = S + i * cols;
      const int64_t c = la[i];
      const scalar_t ci = cf[i], li = l[i];
      if (ci == 0) {  // an ignored anchor (or zero upstream gradient): nothing to spread
        std::fill(Si, Si + cols, scalar_t(0));
        continue;
      }
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j)
        Si[j] = ln[j] != c ? ci * std::exp(Si[j] * it - li) : scalar_t(0);
    }
  });
}

void lse_update_cpu(const at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                    at::Tensor& m, at::Tensor& s, double inv_tau) {
  AT_DISPATCH_FLOATING_TYPES(sim.scalar_type(), "lse_update_cpu",
                             [&] { lse_update_kernel<scalar_t>(sim, ya, yn, m, s, inv_tau); });
}

void grad_tile_cpu(at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                   const at::Tensor& lse, const at::Tensor& coef, double inv_tau) {
  AT_DISPATCH_FLOATING_TYPES(sim.scalar_type(), "grad_tile_cpu",
                             [&] { grad_tile_kernel<scalar_t>(sim, ya, yn, lse, coef, inv_tau); });
}

constexpr ContrastiveTiles kCpuTiles{&lse_update_cpu, &grad_tile_cpu, 1024};

// ---- tensor front-ends ----------------------------------------------------------------------

at::Tensor hardness_forward_cpu(const at::Tensor& x, int64_t patch_h, int64_t patch_w,
                                bool from_logits, double eps) {
  const PatchGrid g = check_hardness_args(x, patch_h, patch_w);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({g.B, g.Nh, g.Nw}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardness_forward_cpu", [&] {
    hardness_forward_kernel<scalar_t>(xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g,
                                      from_logits, eps);
  });
  return out;
}

at::Tensor hardness_backward_cpu(const at::Tensor& grad, const at::Tensor& x, int64_t patch_h,
                                 int64_t patch_w, bool from_logits, double eps) {
  const PatchGrid g = check_hardness_args(x, patch_h, patch_w);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({g.B, g.Nh, g.Nw}), "grad must be (B, Nh, Nw)");
  const at::Tensor xc = x.contiguous(), gc = grad.contiguous().to(x.scalar_type());
  at::Tensor dx = at::empty({g.B, g.K, g.H, g.W}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardness_backward_cpu", [&] {
    hardness_backward_kernel<scalar_t>(gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                                       dx.data_ptr<scalar_t>(), g, from_logits, eps);
  });
  return dx;
}

std::vector<at::Tensor> patch_cutmix_cpu(at::TensorList tensors, const at::Tensor& patch_mask) {
  const PatchGrid g = check_cutmix_args(tensors, patch_mask);
  std::vector<at::Tensor> src, dst;
  for (const at::Tensor& t : tensors) {
    src.push_back(t.contiguous());
    dst.push_back(at::empty(t.sizes(), t.options()));
  }
  const at::Tensor mask = patch_mask.contiguous();
  cutmix_kernel(src, dst, mask.data_ptr<bool>(), g);
  return dst;
}

std::tuple<at::Tensor, at::Tensor> contrastive_forward_cpu(
    const at::Tensor& anchors, const at::Tensor& anchor_labels, const at::Tensor& negatives,
    const at::Tensor& negative_labels, const at::Tensor& positives, const at::Tensor& has_positive,
    double temperature) {
  return contrastive_forward(kCpuTiles, anchors, anchor_labels, negatives, negative_labels,
                             positives, has_positive, temperature);
}

std::tuple<at::Tensor, at::Tensor> contrastive_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& anchors, const at::Tensor& anchor_labels,
    const at::Tensor& negatives, const at::Tensor& negative_labels, const at::Tensor& positives,
    const at::Tensor& has_positive, const at::Tensor& lse, double temperature,
    bool need_grad_negatives) {
  return contrastive_backward(kCpuTiles, grad_loss, anchors, anchor_labels, negatives,
                              negative_labels, positives, has_positive, lse, temperature,
                              need_grad_negatives);
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CPU, m) {
  m.impl("patch_entropy_hardness_forward", &hardness_forward_cpu);
  m.impl("patch_entropy_hardness_backward", &hardness_backward_cpu);
  m.impl("patch_cutmix", &patch_cutmix_cpu);
  m.impl("memory_contrastive_forward", &contrastive_forward_cpu);
  m.impl("memory_contrastive_backward", &contrastive_backward_cpu);
}

}  // namespace busseg
