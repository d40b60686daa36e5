// busseg::memory_contrastive_loss (PH-Net Eq. 15; docs/ops.md), C++/OpenMP CPU: the shared tiled
// driver (common/contrastive_driver.h) with at::mm tiles and the OpenMP tile kernels below. Half
// and bfloat16 inputs are computed in float32 and the outputs cast back (as on CUDA).
#include "common/cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/contrastive_driver.h"
#include "memory_contrastive_loss/checks.h"

namespace busseg {
namespace {

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

std::tuple<at::Tensor, at::Tensor> memory_contrastive_loss_cpu(
    const at::Tensor& anchors, const at::Tensor& anchor_labels, const at::Tensor& negatives,
    const at::Tensor& negative_labels, const at::Tensor& positives, const at::Tensor& has_positive,
    double temperature) {
  check_memory_contrastive_loss_args(anchors, anchor_labels, negatives, negative_labels, positives,
                                     has_positive, temperature);
  auto [loss, lse] =
      contrastive_forward(kCpuTiles, widened(anchors), anchor_labels, widened(negatives),
                          negative_labels, widened(positives), has_positive, temperature);
  return {loss.to(anchors.scalar_type()), lse.to(anchors.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> memory_contrastive_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& anchors, const at::Tensor& anchor_labels,
    const at::Tensor& negatives, const at::Tensor& negative_labels, const at::Tensor& positives,
    const at::Tensor& has_positive, const at::Tensor& lse, double temperature,
    bool need_grad_negatives) {
  check_memory_contrastive_loss_backward_args(grad_loss, anchors, anchor_labels, negatives,
                                              negative_labels, positives, has_positive, lse,
                                              temperature);
  auto [ga, gn] =
      contrastive_backward(kCpuTiles, widened(grad_loss), widened(anchors), anchor_labels,
                           widened(negatives), negative_labels, widened(positives), has_positive,
                           widened(lse), temperature, need_grad_negatives);
  return {ga.to(anchors.scalar_type()), gn.to(negatives.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CPU, m) {
  m.impl("memory_contrastive_loss", &memory_contrastive_loss_cpu);
  m.impl("memory_contrastive_loss_backward", &memory_contrastive_loss_backward_cpu);
}

}  // namespace busseg
