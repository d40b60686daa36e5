// busseg::greedy_proxy_sampling (RA-BUSSeg; docs/ops.md), C++/OpenMP CPU kernels.
//
// Greedy proxy sampling keeps per image the cumulative similarity c(j) and its running max
// (O(HW) state) and computes one row S(s_m, ·) per step straight from the (C, HW) features:
// channel by channel, a contiguous axpy over the pixels (no channels-last copy of the input). With
// at least as many images as threads, images run in parallel; otherwise one image's pixels are
// split over the threads inside every step, with a per-thread arg-min combined after a barrier.
// Each step re-reads the whole image, so the loop is bound by cache bandwidth: float images (on
// CPUs with F16C) stream a half copy instead and re-score exactly only the few pixels that the
// half's error bound cannot rule out (greedy_image_screened).
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
#include <type_traits>
#include <utility>
#include <vector>

#include "common/half_rows.h"
#include "greedy_proxy_sampling/checks.h"

namespace busseg {
namespace {
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

at::Tensor greedy_proxy_sampling_cpu(const at::Tensor& feat, const at::Tensor& first,
                                     int64_t num_proxies, double scale) {
  check_greedy_proxy_sampling_args(feat, first, num_proxies);
  const int64_t B = feat.size(0), C = feat.size(1), HW = feat.size(2) * feat.size(3);
  // (B, C, HW): free for the usual layout. Half and bfloat16 maps are sampled as float maps (the
  // screened path below: exact scores, half the traffic of a float sweep).
  const at::Tensor f = widened(feat).contiguous();
  const at::Tensor s0 = first.contiguous();
  at::Tensor idx = at::empty({B, num_proxies}, first.options());
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "greedy_proxy_sampling_cpu", [&] {
    greedy_batch<scalar_t>(f.data_ptr<scalar_t>(), s0.data_ptr<int64_t>(), B, HW, C, num_proxies,
                           scale, idx.data_ptr<int64_t>());
  });
  return idx;
}
}  // namespace

TORCH_LIBRARY_IMPL(busseg, CPU, m) { m.impl("greedy_proxy_sampling", &greedy_proxy_sampling_cpu); }

}  // namespace busseg
