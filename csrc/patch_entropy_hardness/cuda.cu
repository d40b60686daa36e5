// PH-Net ops (SPEC §3, §4, §6), CUDA kernels. Hardness: a block per patch reduces its pixels'
// entropies (softmax fused for logits); backward a thread per pixel. Cutmix: one launch gathers
// every element of up to kCutmixBatch tensors (any dtype, copied by element size). Contrastive:
// the row-wise tile kernels of the shared tiled driver (the tiles themselves come from cuBLAS).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/phnet.h"

namespace busseg::cuda {
namespace {

constexpr int kThreads = 256;

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
__global__ void hardness_forward_kernel(PatchShape s, const T* __restrict__ x, T* __restrict__ out,
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
__global__ void hardness_backward_kernel(PatchShape s, const T* __restrict__ grad,
                                         const T* __restrict__ x, T* __restrict__ dx,
                                         bool from_logits, double eps, double scale) {
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

template <typename U>
__device__ __forceinline__ void copy_element(const CutmixTensor& t, long long to, long long from) {
  static_cast<U*>(t.dst)[to] = static_cast<const U*>(t.src)[from];
}

__global__ void patch_cutmix_kernel(CutmixBatch batch, const bool* __restrict__ mask, PatchShape s,
                                    long long total) {
  const long long HW = s.H * s.W, Nh = s.H / s.ph, Nw = s.W / s.pw;
  for (long long g = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; g < total;
       g += static_cast<long long>(gridDim.x) * blockDim.x) {
    int t = 0;
    long long e = g;
    while (e >= batch.t[t].numel) e -= batch.t[t++].numel;
    const CutmixTensor& ten = batch.t[t];
    const long long per_image = ten.numel / s.B;
    const long long b = e / per_image, pix = e % HW, y = pix / s.W, x = pix % s.W;
    const bool keep = mask[(b * Nh + y / s.ph) * Nw + x / s.pw];
    const long long from = keep ? e : e + (((b + 1) % s.B) - b) * per_image;
    switch (ten.elem_size) {
      case 1:
        copy_element<uint8_t>(ten, e, from);
        break;
      case 2:
        copy_element<uint16_t>(ten, e, from);
        break;
      case 4:
        copy_element<uint32_t>(ten, e, from);
        break;
      default:
        copy_element<uint64_t>(ten, e, from);
        break;
    }
  }
}

// One warp per row: the row's masked max, then its sum of exponentials.
template <typename A>
__global__ void lse_update_kernel(const A* __restrict__ sim, long long rows, long long cols,
                                  const long long* __restrict__ ya,
                                  const long long* __restrict__ yn, A* __restrict__ m,
                                  A* __restrict__ s, A inv_tau) {
  const long long row = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // the whole warp leaves together
  const A* r = sim + row * cols;
  const long long c = ya[row];
  A mx = A(-INFINITY);
  for (long long j = lane; j < cols; j += 32)
    if (yn[j] != c) mx = max(mx, r[j] * inv_tau);
  mx = warp_max(mx);
  const A m_new = max(m[row], mx);
  A sum = 0;
  for (long long j = lane; j < cols; j += 32)
    if (yn[j] != c) sum += exp(r[j] * inv_tau - m_new);
  sum = warp_sum(sum);
  if (lane == 0) {
    s[row] = s[row] * exp(m[row] - m_new) + sum;
    m[row] = m_new;
  }
}

template <typename A>
__global__ void grad_tile_kernel(A* __restrict__ sim, long long rows, long long cols,
                                 const long long* __restrict__ ya, const long long* __restrict__ yn,
                                 const A* __restrict__ lse, const A* __restrict__ coef, A inv_tau) {
  const long long total = rows * cols;
  for (long long g = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; g < total;
       g += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long i = g / cols, j = g % cols;
    const A ci = coef[i];
    sim[g] = (ci != A(0) && yn[j] != ya[i]) ? ci * exp(sim[g] * inv_tau - lse[i]) : A(0);
  }
}

int grid_for(long long n) {
  return static_cast<int>(std::min<long long>((n + kThreads - 1) / kThreads, 65535LL * 8));
}

}  // namespace

cudaError_t hardness_forward(DType dtype, const PatchShape& s, const void* x, void* out,
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

cudaError_t hardness_backward(DType dtype, const PatchShape& s, const void* grad, const void* x,
                              void* dx, bool from_logits, double eps, cudaStream_t stream) {
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

cudaError_t patch_cutmix(const CutmixBatch& batch, const bool* mask, const PatchShape& s,
                         cudaStream_t stream) {
  long long total = 0;
  for (int t = 0; t < batch.count; ++t) total += batch.t[t].numel;
  if (total == 0) return cudaSuccess;
  patch_cutmix_kernel<<<grid_for(total), kThreads, 0, stream>>>(batch, mask, s, total);
  return cudaGetLastError();
}

cudaError_t contrastive_lse_update(DType dtype, const void* sim, long long rows, long long cols,
                                   const long long* ya, const long long* yn, void* m, void* s,
                                   double inv_tau, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const int warps = kThreads / 32;
  const unsigned blocks = static_cast<unsigned>((rows + warps - 1) / warps);
  if (dtype == DType::f64)
    lse_update_kernel<double><<<blocks, kThreads, 0, stream>>>(
        static_cast<const double*>(sim), rows, cols, ya, yn, static_cast<double*>(m),
        static_cast<double*>(s), inv_tau);
  else if (dtype == DType::f32)
    lse_update_kernel<float><<<blocks, kThreads, 0, stream>>>(
        static_cast<const float*>(sim), rows, cols, ya, yn, static_cast<float*>(m),
        static_cast<float*>(s), static_cast<float>(inv_tau));
  else
    return cudaErrorInvalidValue;  // the binding computes half/bfloat16 tiles in float32
  return cudaGetLastError();
}

cudaError_t contrastive_grad_tile(DType dtype, void* sim, long long rows, long long cols,
                                  const long long* ya, const long long* yn, const void* lse,
                                  const void* coef, double inv_tau, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const int blocks = grid_for(rows * cols);
  if (dtype == DType::f64)
    grad_tile_kernel<double><<<blocks, kThreads, 0, stream>>>(
        static_cast<double*>(sim), rows, cols, ya, yn, static_cast<const double*>(lse),
        static_cast<const double*>(coef), inv_tau);
  else if (dtype == DType::f32)
    grad_tile_kernel<float><<<blocks, kThreads, 0, stream>>>(
        static_cast<float*>(sim), rows, cols, ya, yn, static_cast<const float*>(lse),
        static_cast<const float*>(coef), static_cast<float>(inv_tau));
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace busseg::cuda
