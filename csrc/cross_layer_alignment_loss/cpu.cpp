// busseg::cross_layer_alignment_loss (RA-BUSSeg CRA; docs/ops.md), C++/OpenMP CPU kernels.
//
// The alignment loss runs the blocked driver of common/cra_driver.h with, for float on AVX-512
// CPUs, the products of common/proxy_gemm.h (BLAS otherwise), and the fused row kernels below: per
// pixel row, log-sum-exp of every layer and the L-1 KL terms, and in backward the logit gradients,
// recomputing the probabilities from the logits and the saved log-sum-exp. Only (L, B, HW) row
// statistics are kept between forward and backward. Half and bfloat16 inputs run the float
// kernels on float copies (logits and their softmax in float) and get their outputs cast back.
#include "common/cpu.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "common/cra_driver.h"
#include "common/fast_math.h"
#include "common/proxy_gemm.h"
#include "cross_layer_alignment_loss/checks.h"

namespace busseg {
namespace {

// ---- alignment loss: fused row kernels on a block of logits ---------------------------------
//
// Every element needs one exp (its probability) and, for the input layers of the pairs, one log
// (log(p + eps)); log q is z - lse. In float these run through common/fast_math.h's polynomial
// exp/log, vectorised by the SIMD clones; double keeps std::exp / std::log (exp_of / log_of).

// out[m] = exp(z[m] - shift)
template <typename T>
BUSSEG_SIMD_CLONES void exp_shifted(const T* z, T shift, T* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = exp_of(z[i] - shift);
}

// out[m] = log(p[m] + eps)
template <typename T>
BUSSEG_SIMD_CLONES void log_plus(const T* p, T eps, T* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = log_of(p[i] + eps);
}

// Σ_m KL term of q against p: q (log q - log(p + eps)), 0 * log 0 = 0 (NaN propagates).
template <typename acc_t>
BUSSEG_SIMD_CLONES acc_t kl_sum(const acc_t* q, const acc_t* zq, acc_t lse_q, const acc_t* lpe,
                                int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i)
    s += ((q[i] > 0) | (q[i] != q[i])) ? q[i] * ((zq[i] - lse_q) - lpe[i]) : acc_t(0);
  return s;
}

// One row, all layers: z (L x M, acc) -> prob (L x M) and lse (L); the row's summed KL terms.
template <typename acc_t>
acc_t forward_row(const acc_t* z, int64_t L, int64_t M, acc_t eps, acc_t* prob, acc_t* lpe,
                  acc_t* lse) {
  for (int64_t l = 0; l < L; ++l) {
    const acc_t* zl = z + l * M;
    acc_t* pl = prob + l * M;
    acc_t zmax = -std::numeric_limits<acc_t>::infinity();
    for (int64_t m = 0; m < M; ++m) zmax = nan_max(zmax, zl[m]);
    if (std::isinf(zmax)) {  // all -inf (or +inf present): no finite shift exists
      lse[l] = zmax;
      exp_shifted(zl, zmax, pl, M);
      continue;
    }
    exp_shifted(zl, zmax, pl, M);
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t m = 0; m < M; ++m) sum += pl[m];
    lse[l] = zmax + std::log(sum);
    const acc_t inv = acc_t(1) / sum;
#pragma omp simd
    for (int64_t m = 0; m < M; ++m) pl[m] *= inv;
  }
  acc_t total = 0;
  for (int64_t l = 0; l + 1 < L; ++l) {  // KL(P_{l+1} || P_l)
    log_plus(prob + l * M, eps, lpe, M);
    total += kl_sum(prob + (l + 1) * M, z + (l + 1) * M, lse[l + 1], lpe, M);
  }
  return total;
}

// One row: g (L x M) = ∂(row KL terms)/∂z from z and lse. Pair (input p = P_l, target q =
// P_{l+1}): u = log q - log(p + eps) (0 where q = 0), h = -q / (p + eps);
// ∂/∂z_{l+1} = q (u - <q, u>), ∂/∂z_l = p (h - <p, h>).
template <typename acc_t>
BUSSEG_SIMD_CLONES void pair_grad(const acc_t* p, const acc_t* q, const acc_t* zq, acc_t lse_q,
                                  const acc_t* lpe, acc_t eps, acc_t* gp, acc_t* gq, acc_t* u,
                                  acc_t* h, int64_t n) {
  acc_t A = 0, Bs = 0;
#pragma omp simd reduction(+ : A, Bs)
  for (int64_t i = 0; i < n; ++i) {
    u[i] = ((q[i] > 0) | (q[i] != q[i])) ? (zq[i] - lse_q) - lpe[i] : acc_t(0);
    h[i] = -q[i] / (p[i] + eps);
    A += q[i] * u[i];
    Bs += p[i] * h[i];
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    gq[i] += q[i] * (u[i] - A);
    gp[i] += p[i] * (h[i] - Bs);
  }
}

template <typename scalar_t>
void align_rows_forward(const scalar_t* logits, int64_t L, int64_t R, int64_t M, double eps,
                        at::opmath_type<scalar_t>* lse, double* row_sum) {
  using acc_t = at::opmath_type<scalar_t>;
  const int nt = at::get_num_threads();
  std::vector<double> partial(nt, 0.0);
  parallel_chunks(R, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(L * M), prob(L * M), lpe(M), row_lse(L);
    double total = 0;
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t l = 0; l < L; ++l)
        for (int64_t m = 0; m < M; ++m) z[l * M + m] = acc_t(logits[(l * R + r) * M + m]);
      total += double(
          forward_row<acc_t>(z.data(), L, M, acc_t(eps), prob.data(), lpe.data(), row_lse.data()));
      for (int64_t l = 0; l < L; ++l) lse[l * R + r] = row_lse[l];
    }
    partial[omp_get_thread_num()] = total;
  });
  double sum = 0;
  for (double v : partial) sum += v;
  *row_sum = sum;
}

template <typename scalar_t>
void align_rows_backward(const scalar_t* logits, const at::opmath_type<scalar_t>* lse, int64_t L,
                         int64_t R, int64_t M, double eps, double coef, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  parallel_chunks(R, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(L * M), prob(L * M), lpe(M), g(L * M), u(M), h(M);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t m = 0; m < M; ++m) z[l * M + m] = acc_t(logits[(l * R + r) * M + m]);
        exp_shifted(z.data() + l * M, lse[l * R + r], prob.data() + l * M, M);
      }
      std::fill(g.begin(), g.end(), acc_t(0));
      for (int64_t l = 0; l + 1 < L; ++l) {
        log_plus(prob.data() + l * M, acc_t(eps), lpe.data(), M);
        pair_grad<acc_t>(prob.data() + l * M, prob.data() + (l + 1) * M, z.data() + (l + 1) * M,
                         lse[(l + 1) * R + r], lpe.data(), acc_t(eps), g.data() + l * M,
                         g.data() + (l + 1) * M, u.data(), h.data(), M);
      }
      for (int64_t l = 0; l < L; ++l) {
        scalar_t* out = grad + (l * R + r) * M;
        for (int64_t m = 0; m < M; ++m) out[m] = scalar_t(acc_t(coef) * g[l * M + m]);
      }
    }
  });
}

// ---- alignment loss: the float products on AVX-512 (common/proxy_gemm.h) ------------------------
#ifdef BUSSEG_HAVE_PROXY_GEMM
//
// The proxies are packed once per call as (C_l, M padded to 16) per image, and the proxy
// gradients accumulate in the same layout. Work items are (layer, image, piece) with the pieces
// of the larger layers first, handed out dynamically so the threads finish together.
class ProxyGemmProducts final : public AlignProducts {
 public:
  // Both products read the map through a per-thread panel: up to kPanelRows pixels of each
  // channel copied to contiguous rows. The copy streams the map (its channel rows lie a whole HW
  // apart, a page each) so the micro-kernels read from cache; the panel's stride is padded off a
  // multiple of 4 KiB so a chunk's channel rows do not share cache sets. Channels per chunk of
  // the packed proxies (kept in L1) and per gradient item.
  static constexpr int64_t kPanelRows = 128, kPanelStride = kPanelRows + 16;
  static constexpr int64_t kChunkChannels = 128, kGradChannels = 96;

  ProxyGemmProducts(at::TensorList feats, at::TensorList proxies)
      : AlignProducts(feats, proxies),
        B_(proxies[0].size(0)),
        M_(proxies[0].size(1)),
        ldp_(proxy_gemm::padded(M_)) {
    int64_t max_c = 0;
    for (const at::Tensor& p : proxies) {
      const int64_t C = p.size(2);
      max_c = std::max(max_c, C);
      at::Tensor pt = at::zeros({B_, C, ldp_}, p.options());
      pt.narrow(2, 0, M_).copy_(p.transpose(1, 2));
      packed_.push_back(pt);
    }
    for (size_t l = 0; l < proxies.size(); ++l) order_.push_back(static_cast<int64_t>(l));
    std::stable_sort(order_.begin(), order_.end(),
                     [&](int64_t a, int64_t b) { return proxies[a].size(2) > proxies[b].size(2); });
    panels_.resize(at::get_num_threads());
    for (auto& panel : panels_) panel.resize(max_c * kPanelStride);
  }

  void logits(int64_t r0, int64_t n, at::Tensor& z) override {
    float* z_data = z.data_ptr<float>();
    for_items((n + kPanelRows - 1) / kPanelRows, [&](int64_t l, int64_t b, int64_t piece) {
      const int64_t C = feats_[l].size(1), i0 = piece * kPanelRows;
      const int64_t rows = std::min(kPanelRows, n - i0);
      const float* panel = pack_panel(l, b, 0, C, r0 + i0, rows);
      proxy_gemm::logits(panel, kPanelStride, rows, C, packed_[l].data_ptr<float>() + b * C * ldp_,
                         ldp_, M_, z_data + ((l * B_ + b) * n + i0) * M_, M_, kChunkChannels);
    });
  }

  void accumulate_proxy_grads(const at::Tensor& g, int64_t r0, int64_t n) override {
    if (packed_grads_.empty())
      for (const at::Tensor& pt : packed_) packed_grads_.push_back(at::zeros_like(pt));
    const float* g_data = g.data_ptr<float>();
    const int64_t max_c = feats_[order_[0]].size(1);
    for_items((max_c + kGradChannels - 1) / kGradChannels,
              [&](int64_t l, int64_t b, int64_t piece) {
                const int64_t C = feats_[l].size(1), c0 = piece * kGradChannels;
                if (c0 >= C) return;
                const int64_t channels = std::min(kGradChannels, C - c0);
                for (int64_t i0 = 0; i0 < n; i0 += kPanelRows) {
                  const int64_t rows = std::min(kPanelRows, n - i0);
                  const float* panel = pack_panel(l, b, c0, channels, r0 + i0, rows);
                  proxy_gemm::accumulate_grads(
                      panel, kPanelStride, rows, channels, g_data + ((l * B_ + b) * n + i0) * M_,
                      M_, M_, packed_grads_[l].data_ptr<float>() + (b * C + c0) * ldp_, ldp_);
                }
              });
  }

  std::vector<at::Tensor> proxy_grads() override {
    std::vector<at::Tensor> out;
    for (const at::Tensor& gt : packed_grads_)
      out.push_back(gt.narrow(2, 0, M_).transpose(1, 2).contiguous());
    return out;
  }

 private:
  // This thread's panel holding pixels [row0, row0 + rows) of channels [c0, c0 + channels) of
  // image b of layer l.
  const float* pack_panel(int64_t l, int64_t b, int64_t c0, int64_t channels, int64_t row0,
                          int64_t rows) {
    const at::Tensor& f = feats_[l];
    const float* x = f.data_ptr<float>() + b * f.stride(0) + c0 * f.stride(1) + row0;
    float* panel = panels_[omp_get_thread_num()].data();
    for (int64_t c = 0; c < channels; ++c)
      std::memcpy(panel + c * kPanelStride, x + c * f.stride(1), rows * sizeof(float));
    return panel;
  }

  // body(l, b, piece) for every layer, image and piece < pieces over the threads, the layers with
  // more channels (longer items) first.
  template <typename Body>
  void for_items(int64_t pieces, const Body& body) {
    const int64_t per_layer = B_ * pieces, items = static_cast<int64_t>(order_.size()) * per_layer;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
    for (int64_t item = 0; item < items; ++item) {
      const int64_t l = order_[item / per_layer], rest = item % per_layer;
      body(l, rest / pieces, rest % pieces);
    }
  }

  int64_t B_, M_, ldp_;
  std::vector<at::Tensor> packed_;          // per layer (B, C_l, ldp) proxies, zero padded
  std::vector<at::Tensor> packed_grads_;    // per layer (B, C_l, ldp) proxy-gradient sums
  std::vector<int64_t> order_;              // layers by decreasing channels
  std::vector<std::vector<float>> panels_;  // per thread (C, kPanelStride) pixel panel
};
#endif

// The CPU's products: ProxyGemmProducts for float maps with contiguous pixel rows on AVX-512.
std::unique_ptr<AlignProducts> products_cpu(at::TensorList feats, at::TensorList proxies) {
#ifdef BUSSEG_HAVE_PROXY_GEMM
  bool fast = proxy_gemm::supported() && feats[0].scalar_type() == at::kFloat;
  for (const at::Tensor& f : feats) fast = fast && f.stride(2) == 1;
  if (fast) return std::make_unique<ProxyGemmProducts>(feats, proxies);
#endif
  return std::make_unique<AlignProducts>(feats, proxies);
}

// AlignKernels for the CPU (common/cra_driver.h).
at::Tensor rows_forward_cpu(const at::Tensor& logits, double eps, at::Tensor& lse) {
  const int64_t L = logits.size(0), R = logits.size(1), M = logits.size(2);
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cra_rows_forward_cpu", [&] {
    align_rows_forward<scalar_t>(logits.data_ptr<scalar_t>(), L, R, M, eps,
                                 lse.data_ptr<at::opmath_type<scalar_t>>(), &total);
  });
  return at::scalar_tensor(total, lse.options());
}

void rows_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& lse,
                       double eps, double norm, at::Tensor& grad) {
  const int64_t L = logits.size(0), R = logits.size(1), M = logits.size(2);
  const double coef = grad_loss.item<double>() * norm;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cra_rows_backward_cpu", [&] {
    align_rows_backward<scalar_t>(logits.data_ptr<scalar_t>(),
                                  lse.data_ptr<at::opmath_type<scalar_t>>(), L, R, M, eps, coef,
                                  grad.data_ptr<scalar_t>());
  });
}

constexpr AlignKernels kCpuKernels{&rows_forward_cpu, &rows_backward_cpu, &products_cpu};

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> cross_layer_alignment_loss_cpu(
    at::TensorList feats, at::TensorList proxies, c10::string_view reduction, double eps,
    int64_t block_rows, bool grad_proxies) {
  check_cross_layer_alignment_loss_args(feats, proxies, std::string(reduction), eps, block_rows);
  auto [loss, lse, grads] =
      align_blocked_forward(kCpuKernels, widened(feats), widened(proxies), std::string(reduction),
                            eps, block_rows, grad_proxies);
  for (size_t l = 0; l < grads.size(); ++l) grads[l] = grads[l].to(proxies[l].scalar_type());
  return {loss.to(feats[0].scalar_type()), lse, grads};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>
cross_layer_alignment_loss_backward_cpu(const at::Tensor& grad_loss, at::TensorList feats,
                                        at::TensorList proxies, const at::Tensor& lse,
                                        c10::string_view reduction, double eps, int64_t block_rows,
                                        bool need_grad_feats, bool need_grad_proxies) {
  check_cross_layer_alignment_loss_backward_args(grad_loss, feats, proxies, lse,
                                                 std::string(reduction), eps, block_rows);
  auto [grad_feats, grad_proxies] = align_blocked_backward(
      kCpuKernels, grad_loss, widened(feats), widened(proxies), lse, std::string(reduction), eps,
      block_rows, need_grad_feats, need_grad_proxies);
  for (size_t l = 0; l < grad_feats.size(); ++l)
    grad_feats[l] = grad_feats[l].to(feats[l].scalar_type());
  for (size_t l = 0; l < grad_proxies.size(); ++l)
    grad_proxies[l] = grad_proxies[l].to(proxies[l].scalar_type());
  return {grad_feats, grad_proxies};
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CPU, m) {
  m.impl("cross_layer_alignment_loss", &cross_layer_alignment_loss_cpu);
  m.impl("cross_layer_alignment_loss_backward", &cross_layer_alignment_loss_backward_cpu);
}

}  // namespace busseg
