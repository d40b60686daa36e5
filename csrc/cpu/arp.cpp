// Adjacent relation propagation (SPEC §1), C++/OpenMP CPU kernels.
//
// Features and values are read channels-last, (B, H, W, C), so every affinity is a dot product
// over a contiguous channel vector. Work is split over the B*H*W pixels with OpenMP. Affinities
// are symmetric, a[p, o] = a[p + d*o, -o], so the forward computes only the taps from the centre
// on and reads the mirrored ones from the neighbour, and the backward gives each neighbour one
// combined coefficient (p as query plus p as key): a gather, no write races, no atomics.
// Nothing of size (B, C*k*k, HW) is ever formed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "arp_checks.h"

// Channel loops get an AVX2+FMA clone chosen at load time, so one binary runs everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BUSSEG_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define BUSSEG_SIMD_CLONES
#endif

namespace busseg {
namespace {

struct ArpGeometry {
  int64_t B, C, K, H, W;
  int64_t radius, dilation, taps;  // taps = kernel_size^2, row-major offsets (dy outer)

  int64_t centre() const { return taps / 2; }
  int64_t mirror(int64_t t) const { return taps - 1 - t; }  // offset -o of tap t's offset o

  // Neighbour p + d*o of (y, x) at tap t as a pixel index; false when outside the image.
  bool neighbour(int64_t y, int64_t x, int64_t t, int64_t& q) const {
    const int64_t ks = 2 * radius + 1;
    const int64_t qy = y + dilation * (t / ks - radius);
    const int64_t qx = x + dilation * (t % ks - radius);
    if (qy < 0 || qy >= H || qx < 0 || qx >= W) return false;
    q = qy * W + qx;
    return true;
  }
};

template <typename T>
BUSSEG_SIMD_CLONES T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

template <typename T>
BUSSEG_SIMD_CLONES void axpy(T alpha, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) y[c] += alpha * x[c];
}

// OpenMP over pixels in one contiguous chunk per thread (honouring torch.set_num_threads), so
// each thread allocates its scratch once: body(begin, end).
template <typename F>
inline void parallel_pixels(int64_t n, const F& body) {
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t threads = omp_get_num_threads(), chunk = (n + threads - 1) / threads;
    const int64_t begin = omp_get_thread_num() * chunk, end = std::min(n, begin + chunk);
    if (begin < end) body(begin, end);
  }
}

// The kernels take float or double (at::opmath_type of the two CPU dtypes is the type itself).
template <typename T>
void arp_forward_kernel(const ArpGeometry& g, const T* feat, const T* value, T* out, T* weights,
                        double scale, bool valid) {
  const int64_t HW = g.H * g.W, taps = g.taps;
  const T outside = valid ? -std::numeric_limits<T>::infinity() : T(0);  // zeros: feature 0
  // Pass 1: raw affinities of the taps from the centre on (the rest are their mirrors).
  std::vector<T> raw(g.B * HW * taps);
  parallel_pixels(g.B * HW, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / HW, y = (i % HW) / g.W, x = i % g.W;
      for (int64_t t = g.centre(), q; t < taps; ++t)
        if (g.neighbour(y, x, t, q))
          raw[i * taps + t] = T(scale) * dot(feat + i * g.C, feat + (b * HW + q) * g.C, g.C);
    }
  });
  // Pass 2: complete the taps from the mirrors, softmax, propagate the values.
  parallel_pixels(g.B * HW, [&](int64_t begin, int64_t end) {
    std::vector<T> a(taps);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / HW, p = i % HW, y = p / g.W, x = p % g.W;
      T amax = -std::numeric_limits<T>::infinity();
      for (int64_t t = 0, q; t < taps; ++t) {
        if (!g.neighbour(y, x, t, q))
          a[t] = outside;
        else
          a[t] = t >= g.centre() ? raw[i * taps + t] : raw[(b * HW + q) * taps + g.mirror(t)];
        amax = std::max(amax, a[t]);
      }
      T denom = 0;
      for (int64_t t = 0; t < taps; ++t) denom += (a[t] = std::exp(a[t] - amax));
      for (int64_t t = 0; t < taps; ++t) weights[i * taps + t] = (a[t] /= denom);
      for (int64_t k = 0; k < g.K; ++k) {
        T s = 0;
        for (int64_t t = 0, q; t < taps; ++t)
          if (g.neighbour(y, x, t, q)) s += a[t] * value[(b * HW + q) * g.K + k];
        out[(b * g.K + k) * HW + p] = s;
      }
    }
  });
}

template <typename T>
void arp_backward_kernel(const ArpGeometry& g, const T* grad_out, const T* feat, const T* value,
                         const T* weights, T* grad_feat, T* grad_value, double scale) {
  const int64_t HW = g.H * g.W, taps = g.taps;
  // Pass 1: da[p, t] = scale * w (dw - <w, dw>), with dw[p, t] = <grad_out[:, p], value[:, q]>.
  std::vector<T> da;
  if (grad_feat) {
    da.resize(g.B * HW * taps);
    parallel_pixels(g.B * HW, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / HW, p = i % HW, y = p / g.W, x = p % g.W;
        const T* w = weights + i * taps;
        T* dai = da.data() + i * taps;
        T wdw = 0;
        for (int64_t t = 0, q; t < taps; ++t) {
          T dw = 0;
          if (g.neighbour(y, x, t, q))
            for (int64_t k = 0; k < g.K; ++k)
              dw += grad_out[(b * g.K + k) * HW + p] * value[(b * HW + q) * g.K + k];
          dai[t] = dw;
          wdw += w[t] * dw;
        }
        for (int64_t t = 0; t < taps; ++t) dai[t] = T(scale) * w[t] * (dai[t] - wdw);
      }
    });
  }
  // Pass 2: pixel p gathers from each neighbour q = p + d*o with one coefficient: da[p, o]
  // (p as query) plus da[q, -o] (p as key of q). grad_value gathers w[q, -o] * grad_out[q].
  parallel_pixels(g.B * HW, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / HW, p = i % HW, y = p / g.W, x = p % g.W;
      if (grad_feat) {
        T* gf = grad_feat + i * g.C;
        std::fill(gf, gf + g.C, T(0));
        for (int64_t t = 0, q; t < taps; ++t)
          if (g.neighbour(y, x, t, q)) {
            const int64_t j = b * HW + q;
            axpy(da[i * taps + t] + da[j * taps + g.mirror(t)], feat + j * g.C, gf, g.C);
          }
      }
      if (grad_value)
        for (int64_t k = 0; k < g.K; ++k) {
          T s = 0;
          for (int64_t t = 0, q; t < taps; ++t)
            if (g.neighbour(y, x, t, q))
              s += weights[(b * HW + q) * taps + g.mirror(t)] * grad_out[(b * g.K + k) * HW + q];
          grad_value[(b * g.K + k) * HW + p] = s;
        }
    }
  });
}

ArpGeometry geometry(const at::Tensor& feat, const at::Tensor& value, int64_t kernel_size,
                     int64_t dilation) {
  return {feat.size(0), feat.size(1),          value.size(1), feat.size(2),
          feat.size(3), (kernel_size - 1) / 2, dilation,      kernel_size * kernel_size};
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

std::tuple<at::Tensor, at::Tensor> arp_backward_cpu(const at::Tensor& grad_out,
                                                    const at::Tensor& feat, const at::Tensor& value,
                                                    const at::Tensor& weights, int64_t kernel_size,
                                                    int64_t dilation, double scale,
                                                    bool valid_padding, bool need_grad_feat,
                                                    bool need_grad_value) {
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
