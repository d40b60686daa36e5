// The orders and the count behind busseg::cutmix_patch_mask, shared by the CPU and CUDA kernels
// (host and device code) so that both build the same mask as the reference from the same
// uniforms (busseg_ops/reference/adaptive_patch_cutmix.py):
// - the k hardest patches are shielded: hardness descending, NaN first (torch's sort takes NaN
//   as the largest), ties to the smaller patch index (a stable sort), -0.0 equal to +0.0;
// - the n patches replaced are the first n in the order (shielded, key, index): unshielded
//   patches by their uniform key ascending (NaN last), ties to the smaller index;
// - n = floor((low + (high - low) * u) * N + 0.5) in float32 arithmetic (torch's, on a float32
//   tensor and Python floats: each step rounded to float32), NaN as 0, capped to [0, N - k].
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define BUSSEG_HOST_DEVICE __host__ __device__
#else
#define BUSSEG_HOST_DEVICE
#endif

namespace busseg::cutmix {

// An unsigned integer with the order of the doubles (NaN above +inf, all NaNs equal, -0 = +0).
BUSSEG_HOST_DEVICE inline uint64_t ordered(double x) {
  if (x != x) return ~uint64_t(0) >> 1 | uint64_t(1) << 63;  // above +inf's 0xfff0...0
  uint64_t bits;
  const double canonical = x == 0 ? 0.0 : x;
  std::memcpy(&bits, &canonical, sizeof bits);
  return bits >> 63 ? ~bits : bits | uint64_t(1) << 63;
}

// The same for floats, in 32 bits.
BUSSEG_HOST_DEVICE inline uint32_t ordered(float x) {
  if (x != x) return ~uint32_t(0);
  uint32_t bits;
  const float canonical = x == 0 ? 0.0f : x;
  std::memcpy(&bits, &canonical, sizeof bits);
  return bits >> 31 ? ~bits : bits | uint32_t(1) << 31;
}

// Sort key of the shield order (ascending = hardness descending) ...
BUSSEG_HOST_DEVICE inline uint64_t shield_key(double hardness) { return ~ordered(hardness); }
// ... and of the replacement order.
BUSSEG_HOST_DEVICE inline uint64_t replace_key(bool shielded, float u) {
  return uint64_t(shielded) << 32 | ordered(u);
}

// float32 a * b and a + b, each rounded once (no fused multiply-add, whatever the compiler's
// contraction): on the host through double, where the exact product of two floats fits and a
// sum rounds to the nearest float as if rounded once (53 >= 2 * 24 + 2 bits).
BUSSEG_HOST_DEVICE inline float mul32(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return static_cast<float>(static_cast<double>(a) * static_cast<double>(b));
#endif
}
BUSSEG_HOST_DEVICE inline float add32(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return static_cast<float>(static_cast<double>(a) + static_cast<double>(b));
#endif
}

// n, the patches replaced, from the share's uniform u (N patches, k shielded).
BUSSEG_HOST_DEVICE inline int64_t replaced_count(float u, double low, double high, int64_t N,
                                                 int64_t k) {
  const float share = add32(static_cast<float>(low), mul32(static_cast<float>(high - low), u));
  const float n = std::floor(add32(mul32(share, static_cast<float>(N)), 0.5f));
  if (!(n > 0)) return 0;  // NaN too
  // clamped as a float to the float nearest N - k, then as an integer (as the reference does)
  const float cap = static_cast<float>(N - k);
  const int64_t count = static_cast<int64_t>(n < cap ? n : cap);
  return count < N - k ? count : N - k;
}

}  // namespace busseg::cutmix
