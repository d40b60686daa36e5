// Adjacent relation propagation (SPEC §1), C++/OpenMP CPU kernels.
//
// Features and values are read channels-last, (B, H, W, C), so every affinity is a dot product
// over a contiguous channel vector (vectorised with `omp simd`). Work is split over the B*H*W
// pixels. The backward is two passes: per-pixel affinity gradients `da`, then a gather in
// which each pixel collects what it receives as query and as key, so no write races and no
// atomics. Nothing of size (B, C*k*k, HW) is ever formed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "arp_checks.h"
#include "cpu/common.h"

namespace busseg {
namespace {

struct ArpGeometry {
  int64_t B, C, K, H, W;
  int64_t radius, dilation, taps;  // taps = kernel_size^2, row-major offsets (dy outer)

  // Neighbour of (y, x) at tap t and sign (+1: p + d*o, -1: p - d*o); false when outside.
  bool neighbour(int64_t y, int64_t x, int64_t t, int64_t sign, int64_t& q) const {
    const int64_t ks = 2 * radius + 1;
    const int64_t qy = y + sign * dilation * (t / ks - radius);
    const int64_t qx = x + sign * dilation * (t % ks - radius);
    if (qy < 0 || qy >= H || qx < 0 || qx >= W) return false;
    q = qy * W + qx;
    return true;
  }
};

template <typename scalar_t>
void arp_forward_kernel(const ArpGeometry& g, const scalar_t* feat, const scalar_t* value,
                        scalar_t* out, scalar_t* weights, double scale, bool valid) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = g.H * g.W;
  parallel_pixels(g.B * HW, [&](int64_t begin, int64_t end) {
   std::vector<acc_t> aff(g.taps);
   for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / HW, p = i % HW, y = p / g.W, x = p % g.W;
    const scalar_t* fp = feat + i * g.C;
    scalar_t* w = weights + i * g.taps;
    acc_t amax = -std::numeric_limits<acc_t>::infinity();
    for (int64_t t = 0; t < g.taps; ++t) {
      int64_t q;
      if (g.neighbour(y, x, t, +1, q))
        aff[t] = acc_t(scale) * dot<acc_t>(fp, feat + (b * HW + q) * g.C, g.C);
      else  // zeros: an outside neighbour has feature 0, so affinity 0; valid: excluded
        aff[t] = valid ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
      amax = std::max(amax, aff[t]);
    }
    acc_t denom = 0;
    for (int64_t t = 0; t < g.taps; ++t) denom += (aff[t] = std::exp(aff[t] - amax));
    for (int64_t t = 0; t < g.taps; ++t) w[t] = scalar_t(aff[t] /= denom);
    for (int64_t k = 0; k < g.K; ++k) {
      acc_t s = 0;
      for (int64_t t = 0; t < g.taps; ++t) {
        int64_t q;
        if (g.neighbour(y, x, t, +1, q)) s += aff[t] * acc_t(value[(b * HW + q) * g.K + k]);
      }
      out[(b * g.K + k) * HW + p] = scalar_t(s);
    }
   }
  });
}

template <typename scalar_t>
void arp_backward_kernel(const ArpGeometry& g, const scalar_t* grad_out, const scalar_t* feat,
                         const scalar_t* value, const scalar_t* weights, scalar_t* grad_feat,
                         scalar_t* grad_value, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = g.H * g.W;
  // Pass 1: da[p, t] = scale * w (dw - <w, dw>), with dw[p, t] = <grad_out[:, p], value[:, q]>.
  std::vector<acc_t> da;
  if (grad_feat) {
    da.resize(g.B * HW * g.taps);
    parallel_pixels(g.B * HW, [&](int64_t begin, int64_t end) {
     for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / HW, p = i % HW, y = p / g.W, x = p % g.W;
      const scalar_t* w = weights + i * g.taps;
      acc_t* dai = da.data() + i * g.taps;
      acc_t wdw = 0;
      for (int64_t t = 0; t < g.taps; ++t) {
        int64_t q;
        acc_t dw = 0;
        if (g.neighbour(y, x, t, +1, q))
          for (int64_t k = 0; k < g.K; ++k)
            dw += acc_t(grad_out[(b * g.K + k) * HW + p]) * acc_t(value[(b * HW + q) * g.K + k]);
        dai[t] = dw;
        wdw += acc_t(w[t]) * dw;
      }
      for (int64_t t = 0; t < g.taps; ++t) dai[t] = acc_t(scale) * acc_t(w[t]) * (dai[t] - wdw);
     }
    });
  }
  // Pass 2: each pixel gathers its gradient as query (p + d*o) and as key (p - d*o).
  parallel_pixels(g.B * HW, [&](int64_t begin, int64_t end) {
   std::vector<acc_t> acc(grad_feat ? g.C : 0);
   for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / HW, p = i % HW, y = p / g.W, x = p % g.W;
    if (grad_feat) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t t = 0; t < g.taps; ++t) {
        int64_t q;
        if (g.neighbour(y, x, t, +1, q)) {
          const acc_t c = da[i * g.taps + t];
          const scalar_t* fq = feat + (b * HW + q) * g.C;
#pragma omp simd
          for (int64_t ch = 0; ch < g.C; ++ch) acc[ch] += c * acc_t(fq[ch]);
        }
        if (g.neighbour(y, x, t, -1, q)) {
          const acc_t c = da[(b * HW + q) * g.taps + t];
          const scalar_t* fq = feat + (b * HW + q) * g.C;
#pragma omp simd
          for (int64_t ch = 0; ch < g.C; ++ch) acc[ch] += c * acc_t(fq[ch]);
        }
      }
      scalar_t* gf = grad_feat + i * g.C;
      for (int64_t ch = 0; ch < g.C; ++ch) gf[ch] = scalar_t(acc[ch]);
    }
    if (grad_value) {
      for (int64_t k = 0; k < g.K; ++k) {
        acc_t s = 0;
        for (int64_t t = 0; t < g.taps; ++t) {
          int64_t q;  // the pixel whose tap t lands on p
          if (g.neighbour(y, x, t, -1, q))
            s += acc_t(weights[(b * HW + q) * g.taps + t]) * acc_t(grad_out[(b * g.K + k) * HW + q]);
        }
        grad_value[(b * g.K + k) * HW + p] = scalar_t(s);
      }
    }
   }
  });
}

ArpGeometry geometry(const at::Tensor& feat, const at::Tensor& value, int64_t kernel_size,
                     int64_t dilation) {
  return {feat.size(0), feat.size(1), value.size(1), feat.size(2), feat.size(3),
          (kernel_size - 1) / 2, dilation, kernel_size * kernel_size};
}

// (B, C, H, W) in any layout -> a contiguous (B, H, W, C) view; free for channels-last input.
at::Tensor channels_last(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).contiguous(); }

std::tuple<at::Tensor, at::Tensor> arp_forward_cpu(const at::Tensor& feat, const at::Tensor& value,
                                                   int64_t kernel_size, int64_t dilation,
                                                   double scale, bool valid_padding) {
  check_arp_args(feat, value, kernel_size, dilation);
  const ArpGeometry g = geometry(feat, value, kernel_size, dilation);
  const at::Tensor f = channels_last(feat), v = channels_last(value);
  at::Tensor out = at::empty({g.B, g.K, g.H, g.W}, feat.options());
  at::Tensor weights = at::empty({g.B, g.H, g.W, g.taps}, feat.options());
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "arp_forward_cpu", [&] {
    arp_forward_kernel<scalar_t>(g, f.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                 out.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), scale,
                                 valid_padding);
  });
  return {out, weights};
}

std::tuple<at::Tensor, at::Tensor> arp_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& feat, const at::Tensor& value,
    const at::Tensor& weights, int64_t kernel_size, int64_t dilation, double scale,
    bool valid_padding, bool need_grad_feat, bool need_grad_value) {
  (void)valid_padding;  // encoded in `weights` (zero for excluded taps)
  check_arp_args(feat, value, kernel_size, dilation);
  const ArpGeometry g = geometry(feat, value, kernel_size, dilation);
  TORCH_CHECK_VALUE(weights.sizes() == at::IntArrayRef({g.B, g.H, g.W, g.taps}),
                    "weights must be (B, H, W, k*k), got ", weights.sizes());
  const at::Tensor f = channels_last(feat), v = channels_last(value);
  const at::Tensor go = grad_out.contiguous(), w = weights.contiguous();
  // grad_feat is produced channels-last: (B, H, W, C) memory, returned as a (B, C, H, W) view.
  at::Tensor grad_feat = need_grad_feat ? at::empty({g.B, g.H, g.W, g.C}, feat.options())
                                        : at::empty({0}, feat.options());
  at::Tensor grad_value = need_grad_value ? at::empty({g.B, g.K, g.H, g.W}, value.options())
                                          : at::empty({0}, value.options());
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "arp_backward_cpu", [&] {
    arp_backward_kernel<scalar_t>(
        g, go.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        w.data_ptr<scalar_t>(), need_grad_feat ? grad_feat.data_ptr<scalar_t>() : nullptr,
        need_grad_value ? grad_value.data_ptr<scalar_t>() : nullptr, scale);
  });
  if (need_grad_feat) grad_feat = grad_feat.permute({0, 3, 1, 2});
  return {grad_feat, grad_value};
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CPU, m) {
  m.impl("arp_forward", &arp_forward_cpu);
  m.impl("arp_backward", &arp_backward_cpu);
}

}  // namespace busseg
