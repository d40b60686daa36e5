// busseg::patch_entropy_hardness (PH-Net Eq. 4; docs/ops.md), CUDA kernels. A group of G
// threads (a power of two, 32 to 256: about one thread per vector of the patch) owns a patch;
// a block of 256 threads holds 256 / G patches. Each thread walks its patch in units of V
// neighbouring pixels of one row (V = 16 bytes of T where the patch width, the row length and
// the pointer allow: 128-bit loads and stores; else V = 1), stepping its row and column
// incrementally: no division per pixel. Forward: each pixel's entropy (softmax fused for
// logits) summed per thread, then over the group (shuffles, then shared memory). Backward: the
// patch's gradient read once per thread, every pixel's dx written in the same units.
#include <climits>
#include <cmath>
#include <cstdint>

#include "common/cuda.cuh"
#include "patch_entropy_hardness/cuda.h"

namespace busseg::cuda {
namespace {

constexpr int kThreads = 256;
// Resident blocks per SM that ptxas must allow for (__launch_bounds__): 4 (64 registers; left
// to itself ptxas capped the scalar-unit kernels at 48 and spilled), 1 for double (more
// registers, which ptxas otherwise spilled on sm_90 to fit four blocks).
template <typename T>
constexpr int kMinBlocks = sizeof(T) == 8 ? 1 : 4;
// Pixels per 128-bit vector of T.
template <typename T>
constexpr int kVector = 16 / sizeof(T);

// V values of T at p (aligned to V * sizeof(T) bytes) in the accumulation type, and back.
template <int V, typename T>
__device__ __forceinline__ void load_unit(const T* p, acc_t<T> (&v)[V]) {
  if constexpr (V == 1) {
    v[0] = load(p);
  } else {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = load(e + k);
  }
}
template <int V, typename T>
__device__ __forceinline__ void store_unit(T* p, const acc_t<T> (&v)[V]) {
  if constexpr (V == 1) {
    store(p, v[0]);
  } else {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < V; ++k) store(e + k, v[k]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// Softmax statistics of the V pixels of a unit at x (class k at x + k * HW): the max m and the
// sum s of exp(x - m); (0, 1) for probabilities. p(k) is then class k's probability.
template <int V, typename T>
struct UnitProbs {
  using A = acc_t<T>;
  const T* x;
  size_t HW;
  bool from_logits;
  A m[V], s[V];

  __device__ UnitProbs(const T* x_, int K, size_t HW_, bool logits)
      : x(x_), HW(HW_), from_logits(logits) {
#pragma unroll
    for (int v = 0; v < V; ++v) m[v] = 0, s[v] = 1;
    if (!from_logits) return;
    load_unit<V>(x, m);
    for (int k = 1; k < K; ++k) {
      A e[V];
      load_unit<V>(x + k * HW, e);
#pragma unroll
      for (int v = 0; v < V; ++v) m[v] = max(m[v], e[v]);
    }
#pragma unroll
    for (int v = 0; v < V; ++v) s[v] = 0;
    for (int k = 0; k < K; ++k) {
      A e[V];
      load_unit<V>(x + k * HW, e);
#pragma unroll
      for (int v = 0; v < V; ++v) s[v] += exp(e[v] - m[v]);
    }
  }
  __device__ void operator()(int k, A (&q)[V]) const {
    load_unit<V>(x + k * HW, q);
    if (!from_logits) return;
#pragma unroll
    for (int v = 0; v < V; ++v) q[v] = exp(q[v] - m[v]) / s[v];
  }
};

// A thread's place in its patch group and its walk over the patch's units: unit e = r * U + u
// (row r, unit u of U per row) for e = lane, lane + G, ...; row and unit advance by G's quotient
// and remainder, no division in the loop.
struct PatchWalk {
  long long patch;  // (b, i, j) flattened; >= patches: no patch for this group
  int r, u, dr, du, U;

  __device__ PatchWalk(int G, int U_) : U(U_) {
    const int lane = threadIdx.x & (G - 1);
    patch = static_cast<long long>(blockIdx.x) * (kThreads / G) + threadIdx.x / G;
    r = lane / U, u = lane % U, dr = G / U, du = G % U;
  }
  __device__ void next() {
    r += dr, u += du;
    if (u >= U) u -= U, ++r;
  }
};

// Sum of v over each group of G threads (G a power of two, 32 to kThreads), in the group's first
// thread. Every thread of the block calls it.
template <typename A>
__device__ __forceinline__ A group_sum(A v, int G) {
  __shared__ A partial[kThreads / 32];
  v = warp_sum(v);
  if (G == 32) return v;
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  v = 0;
  if ((threadIdx.x & (G - 1)) == 0)
    for (int w = 0; w < G / 32; ++w) v += partial[threadIdx.x / 32 + w];
  return v;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    hardness_forward_kernel(PatchShape s, int G, long long patches, const T* __restrict__ x,
                            T* __restrict__ out, bool from_logits, double eps, double scale) {
  using A = acc_t<T>;
  const int U = s.pw / V, Nh = static_cast<int>(s.H / s.ph), Nw = static_cast<int>(s.W / s.pw);
  PatchWalk w(G, U);
  A acc = 0;
  if (w.patch < patches) {
    const long long b = w.patch / (static_cast<long long>(Nh) * Nw);
    const int i = static_cast<int>(w.patch / Nw % Nh), j = static_cast<int>(w.patch % Nw);
    const size_t HW = static_cast<size_t>(s.H) * s.W;
    const T* corner =
        x + b * s.K * HW + (static_cast<size_t>(i) * s.ph) * s.W + static_cast<size_t>(j) * s.pw;
    const A e = static_cast<A>(eps);
    for (; w.r < s.ph; w.next()) {
      const UnitProbs<V, T> p(corner + static_cast<size_t>(w.r) * s.W + w.u * V,
                              static_cast<int>(s.K), HW, from_logits);
      for (int k = 0; k < s.K; ++k) {
        A q[V];
        p(k, q);
#pragma unroll
        for (int v = 0; v < V; ++v) acc += q[v] * log(q[v] + e);
      }
    }
  }
  acc = group_sum(acc, G);
  if ((threadIdx.x & (G - 1)) == 0 && w.patch < patches)
    store(out + w.patch, static_cast<A>(scale) * acc);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    hardness_backward_kernel(PatchShape s, int G, long long patches, const T* __restrict__ grad,
                             const T* __restrict__ x, T* __restrict__ dx, bool from_logits,
                             double eps, double scale) {
  using A = acc_t<T>;
  const int U = s.pw / V, Nh = static_cast<int>(s.H / s.ph), Nw = static_cast<int>(s.W / s.pw);
  PatchWalk w(G, U);
  if (w.patch >= patches) return;
  const long long b = w.patch / (static_cast<long long>(Nh) * Nw);
  const int i = static_cast<int>(w.patch / Nw % Nh), j = static_cast<int>(w.patch % Nw);
  const size_t HW = static_cast<size_t>(s.H) * s.W;
  const size_t corner =
      b * s.K * HW + (static_cast<size_t>(i) * s.ph) * s.W + static_cast<size_t>(j) * s.pw;
  const A c = static_cast<A>(scale) * load(grad + w.patch), e = static_cast<A>(eps);
  for (; w.r < s.ph; w.next()) {
    const size_t at = corner + static_cast<size_t>(w.r) * s.W + w.u * V;
    const UnitProbs<V, T> p(x + at, static_cast<int>(s.K), HW, from_logits);
    A dot[V];
#pragma unroll
    for (int v = 0; v < V; ++v) dot[v] = 0;
    if (from_logits)
      for (int k = 0; k < s.K; ++k) {
        A q[V];
        p(k, q);
#pragma unroll
        for (int v = 0; v < V; ++v) dot[v] += q[v] * c * (log(q[v] + e) + q[v] / (q[v] + e));
      }
    for (int k = 0; k < s.K; ++k) {
      A q[V], d[V];
      p(k, q);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        d[v] = c * (log(q[v] + e) + q[v] / (q[v] + e));
        if (from_logits) d[v] = q[v] * (d[v] - dot[v]);
      }
      store_unit<V>(dx + at + k * HW, d);
    }
  }
}

// Units of V pixels when the patch width, the row length and both pointers allow V-vectors.
template <typename T>
bool vectorised(const PatchShape& s, const void* a, const void* b) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return s.pw % kVector<T> == 0 && s.W % kVector<T> == 0 && aligned(a) && aligned(b);
}

// Threads per patch: the patch's units rounded up to a power of two, 32 to kThreads.
int group_size(const PatchShape& s, int V) {
  const long long units = static_cast<long long>(s.ph) * (s.pw / V);
  int G = 32;
  while (G < kThreads && G < units) G *= 2;
  return G;
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, int G, long long patches, cudaStream_t stream, Args... args) {
  const long long blocks = (patches + kThreads / G - 1) / (kThreads / G);
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args...);
}
}  // namespace

cudaError_t patch_entropy_hardness(DType dtype, const PatchShape& s, const void* x, void* out,
                                   bool from_logits, double eps, cudaStream_t stream) {
  const long long patches = s.B * (s.H / s.ph) * (s.W / s.pw);
  const double scale = -1.0 / (std::log(static_cast<double>(s.K)) * s.ph * s.pw);
  if (patches == 0) return cudaSuccess;
  if (patches > INT_MAX) return cudaErrorInvalidValue;  // blocks stay below 2^31
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    T* o = static_cast<T*>(out);
    if (vectorised<T>(s, x, x)) {
      const int G = group_size(s, kVector<T>);
      launch(hardness_forward_kernel<T, kVector<T>>, G, patches, stream, s, G, patches, xt, o,
             from_logits, eps, scale);
    } else {
      const int G = group_size(s, 1);
      launch(hardness_forward_kernel<T, 1>, G, patches, stream, s, G, patches, xt, o, from_logits,
             eps, scale);
    }
  });
}

cudaError_t patch_entropy_hardness_backward(DType dtype, const PatchShape& s, const void* grad,
                                            const void* x, void* dx, bool from_logits, double eps,
                                            cudaStream_t stream) {
  const long long patches = s.B * (s.H / s.ph) * (s.W / s.pw);
  const double scale = -1.0 / (std::log(static_cast<double>(s.K)) * s.ph * s.pw);
  if (patches == 0) return cudaSuccess;
  if (patches > INT_MAX) return cudaErrorInvalidValue;  // blocks stay below 2^31
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(grad);
    const T* xt = static_cast<const T*>(x);
    T* d = static_cast<T*>(dx);
    if (vectorised<T>(s, x, dx)) {
      const int G = group_size(s, kVector<T>);
      launch(hardness_backward_kernel<T, kVector<T>>, G, patches, stream, s, G, patches, g, xt, d,
             from_logits, eps, scale);
    } else {
      const int G = group_size(s, 1);
      launch(hardness_backward_kernel<T, 1>, G, patches, stream, s, G, patches, g, xt, d,
             from_logits, eps, scale);
    }
  });
}
}  // namespace busseg::cuda
