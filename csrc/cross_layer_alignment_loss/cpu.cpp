// Cross-layer relation alignment (SPEC §2), C++/OpenMP CPU kernels.
//
// Greedy proxy sampling keeps per image the cumulative similarity c(j) and its running max
// (O(HW) state) and computes one row S(s_m, ·) per step straight from the (C, HW) features:
// channel by channel, a contiguous axpy over the pixels (no channels-last copy of the input). With
// at least as many images as threads, images run in parallel; otherwise one image's pixels are
// split over the threads inside every step, with a per-thread arg-min combined after a barrier.
// Each step re-reads the whole image, so the loop is bound by cache bandwidth: float images (on
// CPUs with F16C) stream a half copy instead and re-score exactly only the few pixels that the
// half's error bound cannot rule out (greedy_image_screened).
//
// The alignment loss runs the blocked driver of cra_driver.h with, for float on AVX-512 CPUs, the
// products of cpu/proxy_gemm.h (BLAS otherwise), and the fused row kernels below: per pixel row,
// log-sum-exp of every layer and the L-1 KL terms, and in backward the logit gradients, recomputing
// the probabilities from the logits and the saved log-sum-exp. Only (L, B, HW) row statistics are
// kept between forward and backward.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/common.h"
#include "cpu/fast_math.h"
#include "cpu/half_rows.h"
#include "cpu/proxy_gemm.h"
#include "cra_checks.h"
#include "cra_driver.h"

namespace busseg {
namespace {

// max that propagates NaN from either side, like torch.maximum.
template <typename T>
inline T nan_max(T a, T b) {
  return (a != a || a >= b) ? a : b;
}

// The team's choice from per-thread (value, index) candidates (index -1: none). Chunks ascend
// with the thread number, so strict < keeps the smallest index among equal values.
template <typename T>
int64_t team_argmin(const std::pair<T, int64_t>* candidates, int nt) {
  T bv{};
  int64_t bi = -1;
  for (int t = 0; t < nt; ++t)
    if (candidates[t].second >= 0 && (bi < 0 || candidates[t].first < bv))
      bv = candidates[t].first, bi = candidates[t].second;
  return bi;
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
      // Four channels per pass over the row: a quarter of the row's load/store traffic.
      const int64_t n = end - begin, C4 = C - C % 4;
      const scalar_t* fb = f + begin;
      for (int64_t c = 0; c < C4; c += 4)
        axpy4(&fs[c], fb + c * HW, fb + (c + 1) * HW, fb + (c + 2) * HW, fb + (c + 3) * HW,
              row.data(), n);
      for (int64_t c = C4; c < C; ++c) axpy(fs[c], fb + c * HW, row.data(), n);
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
      s = team_argmin(slot.data(), nt);  // the same for every thread; M <= HW: one exists
    }
  }
}

#ifdef BUSSEG_HALF_ROWS
// One step of the screened state of n pixels: fold the row into the float cumulative c and its
// running max, grow the error bound, and return the smallest upper end score + bound (chosen
// pixels have score +inf, so they never count).
BUSSEG_SIMD_CLONES double screened_step(const float* row, float step_relative, float step_absolute,
                                        const float* norm, float* c, float* score, float* bound,
                                        int64_t n) {
  double lowest = std::numeric_limits<double>::infinity();
#pragma omp simd reduction(min : lowest)
  for (int64_t i = 0; i < n; ++i) {
    c[i] += row[i];
    score[i] = score[i] > c[i] ? score[i] : c[i];
    bound[i] += step_relative * norm[i] + step_absolute + 0x1p-23f * std::fabs(c[i]);
    // exact in double: bound >= 2^-23 |score| keeps the two floats within 29 binary orders
    const double upper = double(score[i]) + double(bound[i]);
    lowest = upper < lowest ? upper : lowest;
  }
  return lowest;
}

// candidate[i] = whether pixel i's interval reaches `upper` (so it may be the arg-min)
BUSSEG_SIMD_CLONES void mark_candidates(const float* score, const float* bound, double upper,
                                        char* candidate, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) candidate[i] = double(score[i]) - double(bound[i]) <= upper;
}

// Greedy sampling of one float image through a half copy of its features. Every step streams
// the half copy into approximate scores (float sums, as in greedy_image) and a per-pixel bound
// on their distance to the exact scores; then only the pixels whose interval reaches the
// smallest upper bound are re-scored exactly: double dot products of the float features with
// the proxies, folded in incrementally per pixel (a pixel near the minimum stays there for many
// steps). The choice is the exact arg-min of the double-precision scores whatever the thread
// count; the rest of the image never needs more than its half copy.
//
// Bound per step and pixel j, with q = float(scale) * f[:, s] the float weights and h the half
// copy (|h - f| <= 2^-11 |f| + 2^-25 elementwise, 2^-25 being half the smallest subnormal):
//   |sum q h - scale <f_s, f_j>| <= |q|_2 |f_j|_2 (2^-11 + 2^-22 + 2 (C+2) 2^-24) + 2^-25 |q|_1
// (quantisation, the rounding of q, the float sum over C terms), plus 2^-23 |c~| for adding the
// row into the float cumulative c~; all scaled up by 2^-8 against the bound's own rounding. The
// running max moves by no more than the largest distance so far, which the summed bound covers.
// The bound needs finite features within half range and sums far from float overflow: returns
// false (choosing nothing) otherwise.
bool greedy_image_screened(const float* f, int64_t HW, int64_t C, int64_t first, int64_t M,
                           double scale, int64_t* out, int threads, std::vector<uint16_t>& half) {
  constexpr float kInfF = std::numeric_limits<float>::infinity();
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const double relative = (0x1p-11 + 0x1p-22 + 2.0 * double(C + 2) * 0x1p-24) * (1 + 0x1p-8);
  const double absolute = 0x1p-25 * (1 + 0x1p-8);
  half.resize(C * HW);  // the caller's buffer: reused across images without new page faults
  std::vector<float> approx_c(HW, 0.0f), approx_score(HW, -kInfF), bound(HW, 0.0f), norm(HW);
  std::vector<double> exact_c(HW, 0.0), exact_score(HW, -kInf);
  std::vector<int64_t> exact_upto(HW, 0);  // proxies folded into exact_c / exact_score so far
  std::vector<float> proxies(M * C);       // feature columns of the chosen pixels, in order
  std::vector<double> largest(threads, 0.0), upper(threads);
  std::vector<std::pair<double, int64_t>> best(threads);
  bool screenable = false;
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t chunk = (HW + nt - 1) / nt;
    const int64_t begin = std::min(HW, tid * chunk), end = std::min(HW, begin + chunk);
    const int64_t n = end - begin, C4 = C - C % 4;
    std::vector<double> norm2(n, 0.0);
    for (int64_t c = 0; c < C; ++c)  // each thread converts its own pixels
      largest[tid] = std::max<double>(
          largest[tid],
          to_half_with_squares(f + c * HW + begin, half.data() + c * HW + begin, norm2.data(), n));
    for (int64_t j = 0; j < n; ++j) norm[begin + j] = float(std::sqrt(norm2[j]));
#pragma omp barrier
#pragma omp single
    {
      const double max_abs = *std::max_element(largest.begin(), largest.begin() + nt);
      screenable = max_abs <= kHalfMax && std::isfinite(scale) &&
                   std::fabs(scale) * max_abs * max_abs * double(C) * double(M) < 1e30;
    }  // implicit barrier
    std::vector<float> q(C), row(n), pixel(C);
    std::vector<char> candidate(n);
    // Folds the proxies not yet seen by pixel j into its exact cumulative similarity and score.
    auto rescore_exactly = [&](int64_t j, int64_t proxies_so_far) {
      for (int64_t c = 0; c < C; ++c) pixel[c] = f[c * HW + j];
      for (int64_t i = exact_upto[j]; i < proxies_so_far; ++i) {
        const float* p = proxies.data() + i * C;
        double dot = 0.0;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < C; ++c) dot += double(p[c]) * double(pixel[c]);
        exact_c[j] += scale * dot;
        exact_score[j] = std::max(exact_score[j], exact_c[j]);
      }
      exact_upto[j] = proxies_so_far;
    };
    int64_t s = first;
    for (int64_t m = 0; screenable && m < M; ++m) {
      if (tid == 0) out[m] = s;
      if (s >= begin && s < end) approx_score[s] = kInfF;  // chosen; each thread owns its chunk
      if (m + 1 == M) break;
      double q2 = 0.0, q1 = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        q[c] = float(scale) * f[c * HW + s];
        q2 += double(q[c]) * q[c];
        q1 += std::fabs(double(q[c]));
        if (tid == 0) proxies[m * C + c] = f[c * HW + s];  // read by all after the barrier
      }
      const float step_relative = float(std::sqrt(q2) * relative);
      const float step_absolute =
          float(absolute * (q1 + 2.0 * double(C + 2) * 0x1p-24 * std::sqrt(double(C) * q2)));
      std::fill(row.begin(), row.end(), 0.0f);
      const uint16_t* hb = half.data() + begin;
      for (int64_t c = 0; c < C4; c += 4)
        axpy4_half(&q[c], hb + c * HW, hb + (c + 1) * HW, hb + (c + 2) * HW, hb + (c + 3) * HW,
                   row.data(), n);
      if (C4 < C) {  // the last 1-3 channels, padded with zero weights (adding exact zeros)
        const float w[4] = {q[C4], C4 + 1 < C ? q[C4 + 1] : 0.0f, C4 + 2 < C ? q[C4 + 2] : 0.0f,
                            0.0f};
        const uint16_t* last = hb + (C - 1) * HW;
        axpy4_half(w, hb + C4 * HW, C4 + 1 < C ? hb + (C4 + 1) * HW : last,
                   C4 + 2 < C ? hb + (C4 + 2) * HW : last, last, row.data(), n);
      }
      upper[tid] = screened_step(row.data(), step_relative, step_absolute, norm.data() + begin,
                                 approx_c.data() + begin, approx_score.data() + begin,
                                 bound.data() + begin, n);
#pragma omp barrier
      const double lowest_upper = *std::min_element(upper.begin(), upper.begin() + nt);
      mark_candidates(approx_score.data() + begin, bound.data() + begin, lowest_upper,
                      candidate.data(), n);
      double bv = kInf;
      int64_t bi = -1;
      for (const char *it = candidate.data(), *stop = it + n;
           (it = static_cast<const char*>(std::memchr(it, 1, stop - it))) != nullptr; ++it) {
        const int64_t j = begin + (it - candidate.data());
        rescore_exactly(j, m + 1);
        if (bi < 0 || exact_score[j] < bv) bv = exact_score[j], bi = j;  // ties: smallest index
      }
      best[tid] = {bv, bi};
#pragma omp barrier
      s = team_argmin(best.data(), nt);  // upper/best: next written once all threads read them
    }
  }
  return screenable;
}
#endif

// One image, screened through a half copy (kept in `half`) where that is exact and supported,
// else plain.
template <typename scalar_t>
void greedy_one_image(const scalar_t* f, int64_t HW, int64_t C, int64_t first, int64_t M,
                      double scale, int64_t* out, int threads, std::vector<uint16_t>& half) {
#ifdef BUSSEG_HALF_ROWS
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (M > 1 && half_rows_supported() &&
        greedy_image_screened(f, HW, C, first, M, scale, out, threads, half))
      return;
  }
#endif
  greedy_image<scalar_t>(f, HW, C, first, M, scale, out, threads);
}

// Images in parallel when there are at least as many as threads, else each image's pixels.
template <typename scalar_t>
void greedy_batch(const scalar_t* f, const int64_t* first, int64_t B, int64_t HW, int64_t C,
                  int64_t M, double scale, int64_t* out) {
  const int threads = at::get_num_threads();
  if (B >= threads || threads == 1) {
#pragma omp parallel num_threads(threads)
    {
      std::vector<uint16_t> half;
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < B; ++b)
        greedy_one_image<scalar_t>(f + b * HW * C, HW, C, first[b], M, scale, out + b * M, 1, half);
    }
  } else {
    std::vector<uint16_t> half;
    for (int64_t b = 0; b < B; ++b)
      greedy_one_image<scalar_t>(f + b * HW * C, HW, C, first[b], M, scale, out + b * M, threads,
                                 half);
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

// ---- alignment loss: fused row kernels on a block of logits ---------------------------------
//
// Every element needs one exp (its probability) and, for the input layers of the pairs, one log
// (log(p + eps)); log q is z - lse. In float these run through cpu/fast_math.h's polynomial
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

// ---- alignment loss: the float products on AVX-512 (cpu/proxy_gemm.h) ------------------------
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

// AlignKernels for the CPU (cra_driver.h).
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

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> cra_align_blocked_forward_cpu(
    at::TensorList feats, at::TensorList proxies, c10::string_view reduction, double eps,
    int64_t block_rows, bool grad_proxies) {
  return align_blocked_forward(kCpuKernels, feats, proxies, std::string(reduction), eps, block_rows,
                               grad_proxies);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> cra_align_blocked_backward_cpu(
    const at::Tensor& grad_loss, at::TensorList feats, at::TensorList proxies,
    const at::Tensor& lse, c10::string_view reduction, double eps, int64_t block_rows,
    bool need_grad_feats, bool need_grad_proxies) {
  return align_blocked_backward(kCpuKernels, grad_loss, feats, proxies, lse, std::string(reduction),
                                eps, block_rows, need_grad_feats, need_grad_proxies);
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CPU, m) {
  m.impl("cra_greedy_sampling", &cra_greedy_sampling_cpu);
  m.impl("cra_align_blocked_forward", &cra_align_blocked_forward_cpu);
  m.impl("cra_align_blocked_backward", &cra_align_blocked_backward_cpu);
}

}  // namespace busseg
