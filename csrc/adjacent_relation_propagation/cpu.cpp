// busseg::adjacent_relation_propagation (RA-BUSSeg ARP; docs/ops.md), C++/OpenMP CPU kernels.
//
// Works on the tensors' own NCHW layout, one image row at a time: for a tap, the affinities of
// a whole row are a sum over channels of products of two contiguous rows (the row and its
// shifted neighbour row), so the inner loops run over x and vectorise, and neither the inputs
// nor the gradient are ever transposed. OpenMP splits the B*H rows. Affinities are symmetric,
// a[p, o] = a[p + d*o, -o]: the forward computes the taps from the centre on and reads the
// mirrored ones from the neighbour; the backward gives each neighbour one coefficient (p as
// query plus p as key), a gather with no write races and no atomics. Per-tap buffers (raw
// affinities, weights, their gradients) are (B, taps, H, W); nothing of size (B, C*k*k, HW)
// is formed.
#include "common/cpu.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "adjacent_relation_propagation/checks.h"

namespace busseg {
namespace {

struct ArpGeometry {
  int64_t B, C, K, H, W;
  int64_t radius, dilation, taps;  // taps = kernel_size^2, row-major offsets (dy outer)

  int64_t centre() const { return taps / 2; }
  int64_t mirror(int64_t t) const { return taps - 1 - t; }  // tap of offset -o
  int64_t dy(int64_t t) const { return dilation * (t / (2 * radius + 1) - radius); }
  int64_t dx(int64_t t) const { return dilation * (t % (2 * radius + 1) - radius); }
  // The x range [x0, x1) whose tap-t neighbour lies inside the row; empty if the row is outside.
  bool columns(int64_t y, int64_t t, int64_t& x0, int64_t& x1) const {
    x0 = std::max<int64_t>(0, -dx(t));
    x1 = std::min<int64_t>(W, W - dx(t));
    return y + dy(t) >= 0 && y + dy(t) < H && x0 < x1;
  }
  int64_t plane(int64_t b, int64_t channel, int64_t channels) const {  // start of a (H, W) plane
    return (b * channels + channel) * H * W;
  }
};

// Row y of dst (an (H, W) plane) = sum over taps of coef[t] (taps x W) times src's neighbours at
// tap t: the value propagation of the forward and the feature gradient's gather. The sum runs in
// the accumulator type: in dst itself when it has that type, else in `scratch` (W).
template <typename scalar_t, typename acc_t>
void tap_weighted_row(const ArpGeometry& g, int64_t y, const acc_t* coef, const scalar_t* src,
                      acc_t* scratch, scalar_t* dst) {
  accumulate_row(g.W, scratch, dst + y * g.W, [&](acc_t* row) {
    for (int64_t t = 0, x0, x1; t < g.taps; ++t)
      if (g.columns(y, t, x0, x1))
        multiply_add(row + x0, coef + t * g.W + x0, src + (y + g.dy(t)) * g.W + g.dx(t) + x0,
                     x1 - x0);
  });
}

// The kernels take float, double, half or bfloat16 tensors (NCHW contiguous, per-tap ones
// (B, taps, H, W)) and compute in the accumulator type (double for double, else float): the
// per-tap buffers are in that type and the narrow inputs are widened as they are read. Row
// r = b * H + y.
template <typename scalar_t>
void arp_forward_kernel(const ArpGeometry& g, const scalar_t* feat, const scalar_t* value,
                        scalar_t* out, scalar_t* weights, double scale, bool valid) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = g.H, W = g.W, taps = g.taps;
  const acc_t outside = valid ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);  // zeros: 0
  // Pass 1: affinities of the taps from the centre on; the others are their mirrors.
  std::vector<acc_t> raw(g.B * taps * H * W);
  parallel_chunks(g.B * H, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, y = r % H;
      for (int64_t t = g.centre(), x0, x1; t < taps; ++t) {
        if (!g.columns(y, t, x0, x1)) continue;
        acc_t* acc = raw.data() + g.plane(b, t, taps) + y * W;
        std::fill(acc + x0, acc + x1, acc_t(0));
        for (int64_t c = 0; c < g.C; ++c) {
          const scalar_t* row = feat + g.plane(b, c, g.C) + y * W;
          const scalar_t* shifted = row + g.dy(t) * W + g.dx(t);
          multiply_add(acc + x0, row + x0, shifted + x0, x1 - x0);
        }
        for (int64_t x = x0; x < x1; ++x) acc[x] *= acc_t(scale);
      }
    }
  });
  // Pass 2: complete the taps from the mirrors, softmax over taps, propagate the values.
  parallel_chunks(g.B * H, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(taps * W), amax(W), denom(W), scratch(W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, y = r % H;
      for (int64_t t = 0, x0, x1; t < taps; ++t) {
        acc_t* at = a.data() + t * W;
        std::fill(at, at + W, outside);
        if (!g.columns(y, t, x0, x1)) continue;
        const bool own = t >= g.centre();  // else the neighbour holds it as its mirror tap
        const acc_t* src =
            raw.data() + (own ? g.plane(b, t, taps) + y * W
                              : g.plane(b, g.mirror(t), taps) + (y + g.dy(t)) * W + g.dx(t));
        std::copy(src + x0, src + x1, at + x0);
      }
      std::fill(amax.begin(), amax.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(denom.begin(), denom.end(), acc_t(0));
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t x = 0; x < W; ++x) amax[x] = std::max(amax[x], a[t * W + x]);
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t x = 0; x < W; ++x)
          denom[x] += (a[t * W + x] = std::exp(a[t * W + x] - amax[x]));
      for (int64_t t = 0; t < taps; ++t) {
        scalar_t* w = weights + g.plane(b, t, taps) + y * W;
        for (int64_t x = 0; x < W; ++x) w[x] = scalar_t(a[t * W + x] /= denom[x]);
      }
      for (int64_t k = 0; k < g.K; ++k)
        tap_weighted_row(g, y, a.data(), value + g.plane(b, k, g.K), scratch.data(),
                         out + g.plane(b, k, g.K));
    }
  });
}

template <typename scalar_t>
void arp_backward_kernel(const ArpGeometry& g, const scalar_t* grad_out, const scalar_t* feat,
                         const scalar_t* value, const scalar_t* weights, scalar_t* grad_feat,
                         scalar_t* grad_value, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = g.H, W = g.W, taps = g.taps;
  // Pass 1: da[p, t] = scale * w (dw - <w, dw>), with dw[p, t] = <grad_out[:, p], value[:, q]>.
  std::vector<acc_t> da;
  if (grad_feat) {
    da.assign(g.B * taps * H * W, acc_t(0));
    parallel_chunks(g.B * H, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> wdw(W);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / H, y = r % H;
        std::fill(wdw.begin(), wdw.end(), acc_t(0));
        for (int64_t t = 0, x0, x1; t < taps; ++t) {
          if (!g.columns(y, t, x0, x1)) continue;
          acc_t* dw = da.data() + g.plane(b, t, taps) + y * W;
          for (int64_t k = 0; k < g.K; ++k) {
            const scalar_t* go = grad_out + g.plane(b, k, g.K) + y * W;
            const scalar_t* v = value + g.plane(b, k, g.K) + (y + g.dy(t)) * W + g.dx(t);
            multiply_add(dw + x0, go + x0, v + x0, x1 - x0);
          }
          multiply_add(wdw.data() + x0, weights + g.plane(b, t, taps) + y * W + x0, dw + x0,
                       x1 - x0);
        }
        for (int64_t t = 0; t < taps; ++t) {
          acc_t* dw = da.data() + g.plane(b, t, taps) + y * W;
          const scalar_t* w = weights + g.plane(b, t, taps) + y * W;
          for (int64_t x = 0; x < W; ++x) dw[x] = acc_t(scale) * acc_t(w[x]) * (dw[x] - wdw[x]);
        }
      }
    });
  }
  // Pass 2: pixel p gathers from each neighbour q = p + d*o with one coefficient, da[p, o]
  // (p as query) plus da[q, -o] (p as key of q); grad_value gathers w[q, -o] * grad_out[q].
  parallel_chunks(g.B * H, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> coef(grad_feat ? taps * W : 0), scratch(W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, y = r % H;
      if (grad_feat) {
        for (int64_t t = 0, x0, x1; t < taps; ++t) {
          if (!g.columns(y, t, x0, x1)) continue;
          const acc_t* own = da.data() + g.plane(b, t, taps) + y * W;
          const acc_t* key =
              da.data() + g.plane(b, g.mirror(t), taps) + (y + g.dy(t)) * W + g.dx(t);
          for (int64_t x = x0; x < x1; ++x) coef[t * W + x] = own[x] + key[x];
        }
        for (int64_t c = 0; c < g.C; ++c)
          tap_weighted_row(g, y, coef.data(), feat + g.plane(b, c, g.C), scratch.data(),
                           grad_feat + g.plane(b, c, g.C));
      }
      if (grad_value)
        for (int64_t k = 0; k < g.K; ++k)
          accumulate_row(
              W, scratch.data(), grad_value + g.plane(b, k, g.K) + y * W, [&](acc_t* gv) {
                for (int64_t t = 0, x0, x1; t < taps; ++t)
                  if (g.columns(y, t, x0, x1)) {
                    const int64_t shift = (y + g.dy(t)) * W + g.dx(t);
                    multiply_add(gv + x0, weights + g.plane(b, g.mirror(t), taps) + shift + x0,
                                 grad_out + g.plane(b, k, g.K) + shift + x0, x1 - x0);
                  }
              });
    }
  });
}

ArpGeometry geometry(const at::Tensor& feat, const at::Tensor& value, int64_t kernel_size,
                     int64_t dilation) {
  return {feat.size(0), feat.size(1),          value.size(1), feat.size(2),
          feat.size(3), (kernel_size - 1) / 2, dilation,      kernel_size * kernel_size};
}

std::tuple<at::Tensor, at::Tensor> adjacent_relation_propagation_cpu(const at::Tensor& feat,
                                                                     const at::Tensor& value,
                                                                     int64_t kernel_size,
                                                                     int64_t dilation, double scale,
                                                                     bool valid_padding) {
  check_adjacent_relation_propagation_args(feat, value, kernel_size, dilation);
  const ArpGeometry g = geometry(feat, value, kernel_size, dilation);
  const at::Tensor f = feat.contiguous(), v = value.contiguous();
  at::Tensor out = at::empty({g.B, g.K, g.H, g.W}, feat.options());
  at::Tensor weights = at::empty({g.B, g.taps, g.H, g.W}, feat.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, feat.scalar_type(), "adjacent_relation_propagation_cpu", [&] {
        arp_forward_kernel<scalar_t>(g, f.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                     out.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), scale,
                                     valid_padding);
      });
  return {out, weights};
}

std::tuple<at::Tensor, at::Tensor> adjacent_relation_propagation_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& feat, const at::Tensor& value,
    const at::Tensor& weights, int64_t kernel_size, int64_t dilation, double scale,
    bool valid_padding, bool need_grad_feat, bool need_grad_value) {
  (void)valid_padding;  // encoded in `weights` (zero for excluded taps)
  check_adjacent_relation_propagation_backward_args(grad_out, feat, value, weights, kernel_size,
                                                    dilation);
  const ArpGeometry g = geometry(feat, value, kernel_size, dilation);
  const at::Tensor f = feat.contiguous(), v = value.contiguous();
  const at::Tensor go = grad_out.contiguous(), w = weights.contiguous();
  at::Tensor grad_feat = need_grad_feat ? at::empty({g.B, g.C, g.H, g.W}, feat.options())
                                        : at::empty({0}, feat.options());
  at::Tensor grad_value = need_grad_value ? at::empty({g.B, g.K, g.H, g.W}, value.options())
                                          : at::empty({0}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, feat.scalar_type(), "adjacent_relation_propagation_backward_cpu",
      [&] {
        arp_backward_kernel<scalar_t>(
            g, go.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
            w.data_ptr<scalar_t>(), need_grad_feat ? grad_feat.data_ptr<scalar_t>() : nullptr,
            need_grad_value ? grad_value.data_ptr<scalar_t>() : nullptr, scale);
      });
  return {grad_feat, grad_value};
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CPU, m) {
  m.impl("adjacent_relation_propagation", &adjacent_relation_propagation_cpu);
  m.impl("adjacent_relation_propagation_backward", &adjacent_relation_propagation_backward_cpu);
}

}  // namespace busseg
