// AVX-512 micro-kernels for the two float matrix products of the CRA loss, whose narrow side is
// the M proxies (64 upstream): the logits z = xᵀ pᵀ of a block of pixel rows, and the proxy
// gradient gᵀ xᵀ accumulated over blocks. Both vectorise over the proxies (16 per zmm, up to four
// zmm) and broadcast the other operand, with every accumulator in a register for the whole
// reduction. The products are most of the loss's time, and MKL's sgemm takes a slower path on
// AMD CPUs: 115-145 GFLOP/s on a 2-core Zen 5 VM where these reach about 220.
//
// Layouts: pt is the proxies packed as (C, ldp) with ldp = M rounded up to 16 and zero padding,
// and gt the proxy-gradient accumulator in the same layout; x rows are pixels, contiguous.
// x86-64 only (BUSSEG_HAVE_PROXY_GEMM); elsewhere the loss keeps BLAS.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__)
#define BUSSEG_HAVE_PROXY_GEMM 1
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#define BUSSEG_AVX512 __attribute__((target("avx512f")))
// Fully unrolled tile loops keep every accumulator in a register (GCC otherwise keeps the
// accumulator array in memory and stores it on every step).
#define BUSSEG_UNROLL _Pragma("GCC unroll 8")

namespace busseg {
namespace proxy_gemm {

constexpr int kTile = 6;  // pixel rows (logits) or channels (gradient) per micro-tile
constexpr int kVecs = 4;  // zmm of proxies per micro-tile: 64 proxies
constexpr int kLanes = 16;

inline bool supported() { return __builtin_cpu_supports("avx512f"); }

inline int64_t padded(int64_t M) { return (M + kLanes - 1) / kLanes * kLanes; }

// The proxies [m0, min(m0 + 64, M)) of one micro-tile: how many zmm they take, and the lanes of
// the last one that hold proxies.
struct ProxyChunk {
  int vecs;
  __mmask16 tail;
};
inline ProxyChunk proxy_chunk(int64_t M, int64_t m0) {
  const int64_t m = std::min<int64_t>(kVecs * kLanes, M - m0), r = m % kLanes;
  return {static_cast<int>((m + kLanes - 1) / kLanes),
          r == 0 ? __mmask16(0xFFFF) : __mmask16((1u << r) - 1)};
}

// z[r, 0:16 NV] (+)= Σ_{c < C} x[c ldx + r] pt[c ldp + 0:16 NV] for the R rows of one tile. With
// `accumulate` z is added to (a later chunk of channels); `tail` masks z's last zmm.
template <int R, int NV>
BUSSEG_AVX512 void logits_tile(const float* x, int64_t ldx, int64_t C, const float* pt, int64_t ldp,
                               float* z, int64_t ldz, __mmask16 tail, bool accumulate) {
  __m512 acc[R][NV];
  BUSSEG_UNROLL
  for (int r = 0; r < R; ++r) BUSSEG_UNROLL
  for (int v = 0; v < NV; ++v) {
    const __mmask16 k = v == NV - 1 ? tail : __mmask16(0xFFFF);
    acc[r][v] =
        accumulate ? _mm512_maskz_loadu_ps(k, z + r * ldz + kLanes * v) : _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < C; ++c) {
    __m512 p[NV];
    BUSSEG_UNROLL
    for (int v = 0; v < NV; ++v) p[v] = _mm512_loadu_ps(pt + c * ldp + kLanes * v);
    BUSSEG_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[c * ldx + r]);
      BUSSEG_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, p[v], acc[r][v]);
    }
  }
  BUSSEG_UNROLL
  for (int r = 0; r < R; ++r) {
    BUSSEG_UNROLL
    for (int v = 0; v + 1 < NV; ++v) _mm512_storeu_ps(z + r * ldz + kLanes * v, acc[r][v]);
    _mm512_mask_storeu_ps(z + r * ldz + kLanes * (NV - 1), tail, acc[r][NV - 1]);
  }
}

// gt[r ldp + 0:16 NV] += Σ_{i < n} x[r ldx + i] g[i ldg + 0:16 NV] for the R channels of one tile
// (`tail` masks g's last zmm, which may end the buffer).
template <int R, int NV>
BUSSEG_AVX512 void grad_tile(const float* x, int64_t ldx, int64_t n, const float* g, int64_t ldg,
                             float* gt, int64_t ldp, __mmask16 tail) {
  __m512 acc[R][NV];
  BUSSEG_UNROLL
  for (int r = 0; r < R; ++r) BUSSEG_UNROLL
  for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    __m512 q[NV];
    BUSSEG_UNROLL
    for (int v = 0; v + 1 < NV; ++v) q[v] = _mm512_loadu_ps(g + i * ldg + kLanes * v);
    q[NV - 1] = _mm512_maskz_loadu_ps(tail, g + i * ldg + kLanes * (NV - 1));
    BUSSEG_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + i]);
      BUSSEG_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, q[v], acc[r][v]);
    }
  }
  BUSSEG_UNROLL
  for (int r = 0; r < R; ++r) BUSSEG_UNROLL
  for (int v = 0; v < NV; ++v) {
    float* out = gt + r * ldp + kLanes * v;
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), acc[r][v]));
  }
}

// Every instantiation of a tile kernel in one table, at (R - 1) kVecs + NV - 1.
using LogitsTile = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                            __mmask16, bool);
using GradTile = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                          __mmask16);
struct LogitsKernels {
  template <int R, int NV>
  static constexpr LogitsTile kernel = &logits_tile<R, NV>;
};
struct GradKernels {
  template <int R, int NV>
  static constexpr GradTile kernel = &grad_tile<R, NV>;
};
template <typename Kernels, int... I>
constexpr auto tile_table(std::integer_sequence<int, I...>) {
  return std::array{Kernels::template kernel<I / kVecs + 1, I % kVecs + 1>...};
}
inline constexpr auto kLogitsTiles =
    tile_table<LogitsKernels>(std::make_integer_sequence<int, kTile * kVecs>{});
inline constexpr auto kGradTiles =
    tile_table<GradKernels>(std::make_integer_sequence<int, kTile * kVecs>{});

// z (n, M), row stride ldz, = xᵀ pt[:, :M] for x (C, ldx) holding n pixel rows: chunks of
// `chunk_c` channels (so the chunk of pt stays in L1), tiles of kTile rows, 64 proxies at a time.
inline void logits(const float* x, int64_t ldx, int64_t n, int64_t C, const float* pt, int64_t ldp,
                   int64_t M, float* z, int64_t ldz, int64_t chunk_c) {
  for (int64_t m0 = 0; m0 < M; m0 += kVecs * kLanes) {
    const ProxyChunk chunk = proxy_chunk(M, m0);
    for (int64_t c0 = 0; c0 < C; c0 += chunk_c) {
      const int64_t cc = std::min(chunk_c, C - c0);
      for (int64_t i0 = 0; i0 < n; i0 += kTile) {
        const int r = static_cast<int>(std::min<int64_t>(kTile, n - i0));
        kLogitsTiles[(r - 1) * kVecs + chunk.vecs - 1](x + c0 * ldx + i0, ldx, cc,
                                                       pt + c0 * ldp + m0, ldp, z + i0 * ldz + m0,
                                                       ldz, chunk.tail, c0 > 0);
      }
    }
  }
}

// gt[c, :M] += Σ_i x[c ldx + i] g[i ldg + m] for channels [0, C) of x and n pixel rows.
inline void accumulate_grads(const float* x, int64_t ldx, int64_t n, int64_t C, const float* g,
                             int64_t ldg, int64_t M, float* gt, int64_t ldp) {
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    const int r = static_cast<int>(std::min<int64_t>(kTile, C - c0));
    for (int64_t m0 = 0; m0 < M; m0 += kVecs * kLanes) {
      const ProxyChunk chunk = proxy_chunk(M, m0);
      kGradTiles[(r - 1) * kVecs + chunk.vecs - 1](x + c0 * ldx, ldx, n, g + m0, ldg,
                                                   gt + c0 * ldp + m0, ldp, chunk.tail);
    }
  }
}

}  // namespace proxy_gemm
}  // namespace busseg
#endif  // x86-64
