// IEEE half copies of float rows and weighted sums over them (x86 AVX2 + F16C, checked at run
// time). Greedy sampling streams such a copy: half the bytes of the float features per step.
#pragma once
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define BUSSEG_HALF_ROWS 1

namespace busseg {
namespace {

constexpr float kHalfMax = 65504.0f;  // the largest finite half

inline bool half_rows_supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

// y = half(x), rounded to nearest even, and squares[i] += x[i]^2 in double. Returns the largest
// |x[i]|, or +inf when some x[i] is NaN or beyond kHalfMax (then y is not a faithful copy).
__attribute__((target("avx2,fma,f16c"))) inline float to_half_with_squares(const float* x,
                                                                           uint16_t* y,
                                                                           double* squares,
                                                                           int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f), limit = _mm256_set1_ps(kHalfMax);
  __m256 largest = _mm256_setzero_ps(), outside = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i), a = _mm256_andnot_ps(sign, v);
    outside = _mm256_or_ps(outside, _mm256_cmp_ps(a, limit, _CMP_NLE_UQ));  // NaN too
    largest = _mm256_max_ps(largest, a);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    _mm256_storeu_pd(squares + i, _mm256_fmadd_pd(lo, lo, _mm256_loadu_pd(squares + i)));
    _mm256_storeu_pd(squares + i + 4, _mm256_fmadd_pd(hi, hi, _mm256_loadu_pd(squares + i + 4)));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, largest);
  float result = _mm256_movemask_ps(outside) ? __builtin_inff() : 0.0f;
  for (float lane : lanes) result = lane > result ? lane : result;
  for (; i < n; ++i) {
    const float a = __builtin_fabsf(x[i]);
    result = !(a <= kHalfMax) ? __builtin_inff() : (a > result ? a : result);
    y[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
    squares[i] += double(x[i]) * double(x[i]);
  }
  return result;
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 load_half8(const uint16_t* h) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
}

// y[i] += a[0] * h0[i] + a[1] * h1[i] + a[2] * h2[i] + a[3] * h3[i], one fused multiply-add per
// term in this order (so each y[i] is a plain recursive sum over the rows).
__attribute__((target("avx2,fma,f16c"))) inline void axpy4_half(const float* a, const uint16_t* h0,
                                                                const uint16_t* h1,
                                                                const uint16_t* h2,
                                                                const uint16_t* h3, float* y,
                                                                int64_t n) {
  const __m256 a0 = _mm256_set1_ps(a[0]), a1 = _mm256_set1_ps(a[1]);
  const __m256 a2 = _mm256_set1_ps(a[2]), a3 = _mm256_set1_ps(a[3]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 acc = _mm256_loadu_ps(y + i);
    acc = _mm256_fmadd_ps(a0, load_half8(h0 + i), acc);
    acc = _mm256_fmadd_ps(a1, load_half8(h1 + i), acc);
    acc = _mm256_fmadd_ps(a2, load_half8(h2 + i), acc);
    acc = _mm256_fmadd_ps(a3, load_half8(h3 + i), acc);
    _mm256_storeu_ps(y + i, acc);
  }
  for (; i < n; ++i) {
    float acc = y[i];
    acc = __builtin_fmaf(a[0], _cvtsh_ss(h0[i]), acc);
    acc = __builtin_fmaf(a[1], _cvtsh_ss(h1[i]), acc);
    acc = __builtin_fmaf(a[2], _cvtsh_ss(h2[i]), acc);
    acc = __builtin_fmaf(a[3], _cvtsh_ss(h3[i]), acc);
    y[i] = acc;
  }
}

}  // namespace
}  // namespace busseg
#endif
