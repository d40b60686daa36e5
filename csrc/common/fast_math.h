// Polynomial float exp and log (Cephes, about 1 ulp) written as branch-free scalar code, so loops
// over them vectorise in the SIMD clones (glibc's vector exp/log need -ffast-math). exp_of /
// log_of pick them for float and keep std::exp / std::log for double (gradcheck precision). The NaN
// and range selects become vector blends only when comparisons may be assumed not to trap: the
// build passes -fno-trapping-math (it changes no result, only floating-point exception flags). Both
// are always inlined: in a unit that includes torch's headers GCC's inline-unit-growth limit is
// already spent, and a call left in the loop keeps it scalar.
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace busseg {
namespace {

[[gnu::always_inline]] inline float exp_poly(float x) {
  float xc = x < -87.33654f ? -87.33654f : x;
  xc = xc > 88.3762626f ? 88.3762626f : xc;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const float scale =
      std::bit_cast<float>(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  float out = y * scale;
  out = x < -87.33654f ? 0.0f : out;
  out = x > 88.3762626f ? std::numeric_limits<float>::infinity() : out;
  return x != x ? x : out;
}

[[gnu::always_inline]] inline float log_poly(float x) {
  const bool tiny = x < std::numeric_limits<float>::min();  // denormals: scale up by 2^23 first
  const uint32_t bits = std::bit_cast<uint32_t>(x * (tiny ? 8388608.0f : 1.0f));
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126) - (tiny ? 23.0f : 0.0f);
  float m = std::bit_cast<float>((bits & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
  float out = m + y + 0.693359375f * e;
  out = x == 0.0f ? -std::numeric_limits<float>::infinity() : out;
  out = x == std::numeric_limits<float>::infinity() ? x : out;
  return ((x < 0.0f) | (x != x)) ? std::numeric_limits<float>::quiet_NaN() : out;
}

[[gnu::always_inline]] inline float exp_of(float x) { return exp_poly(x); }
inline double exp_of(double x) { return std::exp(x); }
[[gnu::always_inline]] inline float log_of(float x) { return log_poly(x); }
inline double log_of(double x) { return std::log(x); }

}  // namespace
}  // namespace busseg
