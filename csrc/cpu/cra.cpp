// Cross-layer relation alignment (SPEC §2), C++/OpenMP CPU kernels.
//
// Greedy proxy sampling keeps per image the cumulative similarity c(j) and its running max
// (O(HW) state) and computes one row S(s_m, ·) per step straight from the (C, HW) features:
// channel by channel, a contiguous axpy over the pixels (no channels-last copy of the input). With
// at least as many images as threads, images run in parallel; otherwise one image's pixels are
// split over the threads inside every step, with a per-thread arg-min combined after one barrier.
//
// The alignment loss takes the stacked logits (L, B, HW, M) (computed by BLAS outside) and does
// everything after them in one pass per pixel row: log-sum-exp of every layer, the L-1 KL terms,
// and in backward the logit gradients, recomputing the probabilities from logits and the saved
// log-sum-exp. Only (L, B, HW) row statistics are kept between forward and backward.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/common.h"
#include "cra_checks.h"

namespace busseg {
namespace {

// max that propagates NaN from either side, like torch.maximum.
template <typename T>
inline T nan_max(T a, T b) {
  return (a != a || a >= b) ? a : b;
}

// Greedy sampling of one image, features (C, HW) as stored (no copy), with a team of
// `threads`. Each thread owns a contiguous chunk of pixels; per step it accumulates its part of
// the row S(s, ·) channel by channel (contiguous, vectorised axpy over the chunk).
template <typename scalar_t>
void greedy_image(const scalar_t* f, int64_t HW, int64_t C, int64_t first, int64_t M, double scale,
                  int64_t* out, int threads) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  std::vector<acc_t> cumulative(HW, acc_t(0)), score(HW, -kInf);
  std::vector<unsigned char> chosen(HW, 0);
  // Per-thread (score, index) candidates, double-buffered by step parity: one barrier a step.
  std::vector<std::pair<acc_t, int64_t>> best[2];
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#pragma omp single
    {
      best[0].resize(nt);
      best[1].resize(nt);
    }  // implicit barrier after single
    const int64_t chunk = (HW + nt - 1) / nt;
    const int64_t begin = std::min(HW, tid * chunk), end = std::min(HW, begin + chunk);
    std::vector<acc_t> fs(C), row(end - begin);
    int64_t s = first;
    for (int64_t m = 0; m < M; ++m) {
      if (tid == 0) out[m] = s;
      if (s >= begin && s < end) chosen[s] = 1;  // each thread owns its chunk's state
      if (m + 1 == M) break;
      for (int64_t c = 0; c < C; ++c) fs[c] = acc_t(scale) * acc_t(f[c * HW + s]);
      std::fill(row.begin(), row.end(), acc_t(0));
      for (int64_t c = 0; c < C; ++c) axpy(fs[c], f + c * HW + begin, row.data(), end - begin);
      acc_t bv = kInf;
      int64_t bi = -1;
      for (int64_t j = begin; j < end; ++j) {
        cumulative[j] += row[j - begin];
        score[j] = nan_max(score[j], cumulative[j]);
        if (chosen[j]) continue;
        const acc_t key = std::isnan(score[j]) ? kInf : score[j];  // NaN counts as +inf
        if (bi < 0 || key < bv) bv = key, bi = j;                  // ties: smallest index
      }
      auto& slot = best[m & 1];
      slot[tid] = {bv, bi};
#pragma omp barrier
      bv = kInf, bi = -1;
      for (int t = 0; t < nt; ++t)  // chunks ascend with t, so strict < keeps the smallest index
        if (slot[t].second >= 0 && (bi < 0 || slot[t].first < bv))
          bv = slot[t].first, bi = slot[t].second;
      s = bi;  // every thread reaches the same choice; M <= HW guarantees one exists
    }
  }
}

// Images in parallel when there are at least as many as threads, else each image's pixels.
template <typename scalar_t>
void greedy_batch(const scalar_t* f, const int64_t* first, int64_t B, int64_t HW, int64_t C,
                  int64_t M, double scale, int64_t* out) {
  const int threads = at::get_num_threads();
  if (B >= threads || threads == 1) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b)
      greedy_image<scalar_t>(f + b * HW * C, HW, C, first[b], M, scale, out + b * M, 1);
  } else {
    for (int64_t b = 0; b < B; ++b)
      greedy_image<scalar_t>(f + b * HW * C, HW, C, first[b], M, scale, out + b * M, threads);
  }
}

at::Tensor cra_greedy_sampling_cpu(const at::Tensor& feat, const at::Tensor& first,
                                   int64_t num_proxies, double scale) {
  check_greedy_args(feat, first, num_proxies);
  const int64_t B = feat.size(0), C = feat.size(1), HW = feat.size(2) * feat.size(3);
  const at::Tensor f = feat.contiguous();  // (B, C, HW): free for the usual layout
  const at::Tensor s0 = first.contiguous();
  at::Tensor idx = at::empty({B, num_proxies}, first.options());
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "cra_greedy_sampling_cpu", [&] {
    greedy_batch<scalar_t>(f.data_ptr<scalar_t>(), s0.data_ptr<int64_t>(), B, HW, C, num_proxies,
                           scale, idx.data_ptr<int64_t>());
  });
  return idx;
}

template <typename acc_t, typename scalar_t>
inline acc_t log_sum_exp(const scalar_t* z, int64_t M) {
  acc_t zmax = -std::numeric_limits<acc_t>::infinity();
  for (int64_t m = 0; m < M; ++m) zmax = nan_max(zmax, acc_t(z[m]));
  if (std::isinf(zmax)) return zmax;  // all -inf (or +inf present): no finite shift exists
  acc_t sum = 0;
  for (int64_t m = 0; m < M; ++m) sum += std::exp(acc_t(z[m]) - zmax);
  return zmax + std::log(sum);
}

// Per pixel row: p_l = softmax(z_l) from z and the saved lse, into prob (L x M).
template <typename acc_t, typename scalar_t>
inline void row_probs(const scalar_t* logits, const acc_t* lse, int64_t L, int64_t R, int64_t r,
                      int64_t M, acc_t* prob) {
  for (int64_t l = 0; l < L; ++l) {
    const scalar_t* z = logits + (l * R + r) * M;
    const acc_t s = lse[l * R + r];
    for (int64_t m = 0; m < M; ++m) prob[l * M + m] = std::exp(acc_t(z[m]) - s);
  }
}

template <typename scalar_t>
void align_forward_kernel(const scalar_t* logits, int64_t L, int64_t R, int64_t M, double eps,
                          at::opmath_type<scalar_t>* lse, double* row_sum) {
  using acc_t = at::opmath_type<scalar_t>;
  const int nt = at::get_num_threads();
  std::vector<double> partial(nt, 0.0);
  parallel_chunks(R, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> prob(L * M);
    double total = 0;
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t l = 0; l < L; ++l)
        lse[l * R + r] = log_sum_exp<acc_t>(logits + (l * R + r) * M, M);
      row_probs(logits, lse, L, R, r, M, prob.data());
      for (int64_t l = 0; l + 1 < L; ++l) {  // KL(P_{l+1} || P_l) = sum q (log q - log(p + eps))
        const acc_t* p = prob.data() + l * M;
        const acc_t* q = prob.data() + (l + 1) * M;
        const scalar_t* zq = logits + ((l + 1) * R + r) * M;
        const acc_t lse_q = lse[(l + 1) * R + r];
        acc_t kl = 0;
        for (int64_t m = 0; m < M; ++m)
          if (q[m] > 0 || q[m] != q[m])  // 0 * log 0 = 0, as in KLDivLoss; NaN propagates
            kl += q[m] * ((acc_t(zq[m]) - lse_q) - std::log(p[m] + acc_t(eps)));
        total += double(kl);
      }
    }
    partial[omp_get_thread_num()] = total;
  });
  double sum = 0;
  for (double v : partial) sum += v;
  *row_sum = sum;
}

template <typename scalar_t>
void align_backward_kernel(const scalar_t* logits, const at::opmath_type<scalar_t>* lse, int64_t L,
                           int64_t R, int64_t M, double eps, double coef, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  parallel_chunks(R, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> prob(L * M), log_p_eps(M), g(L * M);
    for (int64_t r = begin; r < end; ++r) {
      row_probs(logits, lse, L, R, r, M, prob.data());
      std::fill(g.begin(), g.end(), acc_t(0));
      for (int64_t l = 0; l + 1 < L; ++l) {  // pair (input P_l = p, target P_{l+1} = q)
        const acc_t* p = prob.data() + l * M;
        const acc_t* q = prob.data() + (l + 1) * M;
        const scalar_t* zq = logits + ((l + 1) * R + r) * M;
        const acc_t lse_q = lse[(l + 1) * R + r];
        // u = log q - log(p + eps), h = -q / (p + eps); A = <q, u>, Bsum = <p, h>
        acc_t A = 0, Bsum = 0;
        for (int64_t m = 0; m < M; ++m) {
          log_p_eps[m] = std::log(p[m] + acc_t(eps));
          if (q[m] > 0 || q[m] != q[m]) A += q[m] * ((acc_t(zq[m]) - lse_q) - log_p_eps[m]);
          Bsum -= p[m] * q[m] / (p[m] + acc_t(eps));
        }
        acc_t* gp = g.data() + l * M;
        acc_t* gq = g.data() + (l + 1) * M;
        for (int64_t m = 0; m < M; ++m) {
          const acc_t u =
              (q[m] > 0 || q[m] != q[m]) ? (acc_t(zq[m]) - lse_q) - log_p_eps[m] : acc_t(0);
          gq[m] += q[m] * (u - A);
          gp[m] += p[m] * (-q[m] / (p[m] + acc_t(eps)) - Bsum);
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        scalar_t* out = grad + (l * R + r) * M;
        for (int64_t m = 0; m < M; ++m) out[m] = scalar_t(acc_t(coef) * g[l * M + m]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cra_align_forward_cpu(const at::Tensor& logits,
                                                         c10::string_view reduction, double eps) {
  const double norm = check_align_args(logits, std::string(reduction), eps);
  const int64_t L = logits.size(0), R = logits.size(1) * logits.size(2), M = logits.size(3);
  const at::Tensor z = logits.contiguous();
  at::Tensor lse = at::empty({L, logits.size(1), logits.size(2)},
                             logits.options().dtype(at::toOpMathType(logits.scalar_type())));
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cra_align_forward_cpu", [&] {
    align_forward_kernel<scalar_t>(z.data_ptr<scalar_t>(), L, R, M, eps,
                                   lse.data_ptr<at::opmath_type<scalar_t>>(), &total);
  });
  return {at::scalar_tensor(total * norm, logits.options()), lse};
}

at::Tensor cra_align_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                  const at::Tensor& lse, c10::string_view reduction, double eps) {
  const double norm = check_align_args(logits, std::string(reduction), eps);
  check_lse(logits, lse);
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must be a scalar, got ", grad_loss.sizes());
  const int64_t L = logits.size(0), R = logits.size(1) * logits.size(2), M = logits.size(3);
  const at::Tensor z = logits.contiguous();
  const at::Tensor s = lse.to(at::toOpMathType(logits.scalar_type())).contiguous();
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  const double coef = grad_loss.item<double>() * norm;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cra_align_backward_cpu", [&] {
    align_backward_kernel<scalar_t>(z.data_ptr<scalar_t>(), s.data_ptr<at::opmath_type<scalar_t>>(),
                                    L, R, M, eps, coef, grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CPU, m) {
  m.impl("cra_greedy_sampling", &cra_greedy_sampling_cpu);
  m.impl("cra_align_forward", &cra_align_forward_cpu);
  m.impl("cra_align_backward", &cra_align_backward_cpu);
}

}  // namespace busseg
