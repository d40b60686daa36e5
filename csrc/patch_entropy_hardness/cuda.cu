// busseg::patch_entropy_hardness (PH-Net Eq. 4; docs/ops.md), CUDA kernels: a block per patch
// reduces its pixels' entropies (softmax fused for logits); backward a thread per pixel.
#include <cmath>

#include "common/cuda.cuh"
#include "patch_entropy_hardness/cuda.h"

namespace busseg::cuda {
namespace {

constexpr int kThreads = 256;
// Resident blocks per SM that ptxas must allow for (__launch_bounds__): none asked (0), but 1 for
// double, where ptxas otherwise spilled (sm_90) to fit four blocks.
template <typename T>
constexpr int kMinBlocks = sizeof(T) == 8 ? 1 : 0;

// Class probabilities of pixel `pix` come from x + k*HW + pix; softmax statistics (max, sum).
template <typename T>
struct PixelProbs {
  const T* x;
  long long HW;
  acc_t<T> m, s;
  bool from_logits;

  __device__ PixelProbs(const T* x_, long long K, long long HW_, bool logits)
      : x(x_), HW(HW_), m(0), s(1), from_logits(logits) {
    if (!from_logits) return;
    m = load(x);
    for (long long k = 1; k < K; ++k) m = max(m, load(x + k * HW));
    s = 0;
    for (long long k = 0; k < K; ++k) s += exp(load(x + k * HW) - m);
  }
  __device__ acc_t<T> operator()(long long k) const {
    const acc_t<T> v = load(x + k * HW);
    return from_logits ? exp(v - m) / s : v;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    hardness_forward_kernel(PatchShape s, const T* __restrict__ x, T* __restrict__ out,
                            bool from_logits, double eps, double scale) {
  using A = acc_t<T>;
  __shared__ A partial[kThreads / 32];
  const long long Nh = s.H / s.ph, Nw = s.W / s.pw, patch = blockIdx.x;
  const long long b = patch / (Nh * Nw), i = (patch / Nw) % Nh, j = patch % Nw;
  const long long HW = s.H * s.W, n = static_cast<long long>(s.ph) * s.pw;
  A acc = 0;
  for (long long t = threadIdx.x; t < n; t += blockDim.x) {
    const long long pix = (i * s.ph + t / s.pw) * s.W + j * s.pw + t % s.pw;
    const PixelProbs<T> p(x + b * s.K * HW + pix, s.K, HW, from_logits);
    for (long long k = 0; k < s.K; ++k) {
      const A q = p(k);
      acc += q * log(q + static_cast<A>(eps));
    }
  }
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    A v = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : A(0);
    v = warp_sum(v);
    if (threadIdx.x == 0) store(out + patch, static_cast<A>(scale) * v);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    hardness_backward_kernel(PatchShape s, const T* __restrict__ grad, const T* __restrict__ x,
                             T* __restrict__ dx, bool from_logits, double eps, double scale) {
  using A = acc_t<T>;
  const long long HW = s.H * s.W;
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= s.B * HW) return;
  const long long b = idx / HW, pix = idx % HW, y = pix / s.W, xx = pix % s.W;
  const long long Nh = s.H / s.ph, Nw = s.W / s.pw;
  const A c = static_cast<A>(scale) * load(grad + (b * Nh + y / s.ph) * Nw + xx / s.pw);
  const A e = static_cast<A>(eps);
  const PixelProbs<T> p(x + b * s.K * HW + pix, s.K, HW, from_logits);
  A dot = 0;
  if (from_logits)
    for (long long k = 0; k < s.K; ++k) {
      const A q = p(k);
      dot += q * c * (log(q + e) + q / (q + e));
    }
  for (long long k = 0; k < s.K; ++k) {
    const A q = p(k);
    A d = c * (log(q + e) + q / (q + e));
    if (from_logits) d = q * (d - dot);
    store(dx + b * s.K * HW + k * HW + pix, d);
  }
}
}  // namespace

cudaError_t patch_entropy_hardness(DType dtype, const PatchShape& s, const void* x, void* out,
                                   bool from_logits, double eps, cudaStream_t stream) {
  const long long patches = s.B * (s.H / s.ph) * (s.W / s.pw);
  const double scale = -1.0 / (std::log(static_cast<double>(s.K)) * s.ph * s.pw);
  if (patches == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    hardness_forward_kernel<T><<<static_cast<unsigned>(patches), kThreads, 0, stream>>>(
        s, static_cast<const T*>(x), static_cast<T*>(out), from_logits, eps, scale);
  });
}

cudaError_t patch_entropy_hardness_backward(DType dtype, const PatchShape& s, const void* grad,
                                            const void* x, void* dx, bool from_logits, double eps,
                                            cudaStream_t stream) {
  const long long pixels = s.B * s.H * s.W;
  const double scale = -1.0 / (std::log(static_cast<double>(s.K)) * s.ph * s.pw);
  if (pixels == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    hardness_backward_kernel<T><<<ceil_div(pixels, kThreads), kThreads, 0, stream>>>(
        s, static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<T*>(dx), from_logits,
        eps, scale);
  });
}
}  // namespace busseg::cuda
