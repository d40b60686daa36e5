// busseg::adjacent_relation_propagation, CUDA kernels. One warp per pixel: lanes split the
// channels of each affinity dot product, then the taps for the softmax and the value sum. The
// backward is a per-pixel pass for the affinity gradients followed by a gather (each pixel
// collects what it receives as query and as key): no atomics.
#include <cmath>

#include "adjacent_relation_propagation/cuda.h"
#include "common/cuda.cuh"

namespace busseg::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

struct Pixel {
  long long i, b, p;  // flat index, batch, pixel in image
  int y, x;
};

// The pixel of this warp (one warp per pixel); false past the last one, for the whole warp.
__device__ __forceinline__ bool warp_pixel(const ArpShape& s, Pixel& px) {
  const long long HW = s.H * s.W;
  px.i = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (px.i >= s.B * HW) return false;
  px.b = px.i / HW;
  px.p = px.i % HW;
  px.y = static_cast<int>(px.p / s.W);
  px.x = static_cast<int>(px.p % s.W);
  return true;
}

// Neighbour at tap t in direction sign (+1: p + d*o, -1: p - d*o) as a flat index; -1 outside.
__device__ __forceinline__ long long neighbour(const ArpShape& s, const Pixel& px, int t,
                                               int sign) {
  const int r = s.kernel_size / 2;
  const int qy = px.y + sign * s.dilation * (t / s.kernel_size - r);
  const int qx = px.x + sign * s.dilation * (t % s.kernel_size - r);
  if (qy < 0 || qy >= s.H || qx < 0 || qx >= s.W) return -1;
  return px.b * s.H * s.W + static_cast<long long>(qy) * s.W + qx;
}

template <typename T>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    arp_forward_kernel(ArpShape s, const T* __restrict__ feat, const T* __restrict__ value,
                       T* __restrict__ out, T* __restrict__ weights, double scale) {
  using A = acc_t<T>;
  extern __shared__ unsigned char smem[];
  const int taps = s.kernel_size * s.kernel_size, lane = threadIdx.x;
  A* aff = reinterpret_cast<A*>(smem) + threadIdx.y * taps;
  Pixel px;
  if (!warp_pixel(s, px)) return;
  const long long i = px.i;
  const T* fp = feat + i * s.C;

  for (int t = 0; t < taps; ++t) {
    const long long q = neighbour(s, px, t, +1);
    A part = 0;
    if (q >= 0)
      for (long long c = lane; c < s.C; c += 32) part += load(fp + c) * load(feat + q * s.C + c);
    part = warp_sum(part);
    if (lane == 0)
      aff[t] = q >= 0 ? static_cast<A>(scale) * part : (s.valid_padding ? A(-INFINITY) : A(0));
  }
  __syncwarp();
  A amax = A(-INFINITY), denom = 0;
  for (int t = lane; t < taps; t += 32) amax = max(amax, aff[t]);
  amax = warp_max(amax);
  for (int t = lane; t < taps; t += 32) denom += exp(aff[t] - amax);
  denom = warp_sum(denom);
  __syncwarp();
  for (int t = lane; t < taps; t += 32) {
    aff[t] = exp(aff[t] - amax) / denom;
    store(weights + (px.b * taps + t) * s.H * s.W + px.p, aff[t]);
  }
  __syncwarp();
  for (int k = 0; k < s.K; ++k) {
    A acc = 0;
    for (int t = lane; t < taps; t += 32) {
      const long long q = neighbour(s, px, t, +1);
      if (q >= 0) acc += aff[t] * load(value + q * s.K + k);
    }
    acc = warp_sum(acc);
    if (lane == 0) store(out + (px.b * s.K + k) * s.H * s.W + px.p, acc);
  }
}

// da[i, t] = scale * w (dw - <w, dw>), dw[i, t] = <grad_out[:, i], value[q, :]>.
template <typename T>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    arp_affinity_grad_kernel(ArpShape s, const T* __restrict__ grad_out,
                             const T* __restrict__ value, const T* __restrict__ weights,
                             acc_t<T>* __restrict__ da, double scale) {
  using A = acc_t<T>;
  const int taps = s.kernel_size * s.kernel_size, lane = threadIdx.x;
  Pixel px;
  if (!warp_pixel(s, px)) return;
  const long long i = px.i;
  const long long HW = s.H * s.W;
  A wdw = 0;
  for (int t = lane; t < taps; t += 32) {
    const long long q = neighbour(s, px, t, +1);
    A dw = 0;
    if (q >= 0)
      for (int k = 0; k < s.K; ++k)
        dw += load(grad_out + (px.b * s.K + k) * HW + px.p) * load(value + q * s.K + k);
    da[i * taps + t] = dw;
    wdw += load(weights + (px.b * taps + t) * HW + px.p) * dw;
  }
  wdw = warp_sum(wdw);
  for (int t = lane; t < taps; t += 32)
    da[i * taps + t] = static_cast<A>(scale) * load(weights + (px.b * taps + t) * HW + px.p) *
                       (da[i * taps + t] - wdw);
}

template <typename T>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    arp_gather_grad_kernel(ArpShape s, const T* __restrict__ grad_out, const T* __restrict__ feat,
                           const T* __restrict__ weights, const acc_t<T>* __restrict__ da,
                           T* __restrict__ grad_feat, T* __restrict__ grad_value) {
  using A = acc_t<T>;
  const int taps = s.kernel_size * s.kernel_size, lane = threadIdx.x;
  Pixel px;
  if (!warp_pixel(s, px)) return;
  const long long i = px.i;
  const long long HW = s.H * s.W;
  if (grad_feat != nullptr) {
    for (long long c = lane; c < s.C; c += 32) {
      A acc = 0;
      for (int t = 0; t < taps; ++t) {
        const long long q = neighbour(s, px, t, +1);  // p as query of q
        if (q >= 0) acc += da[i * taps + t] * load(feat + q * s.C + c);
        const long long k = neighbour(s, px, t, -1);  // p as key of k
        if (k >= 0) acc += da[k * taps + t] * load(feat + k * s.C + c);
      }
      store(grad_feat + i * s.C + c, acc);
    }
  }
  if (grad_value != nullptr) {
    for (int k = lane; k < s.K; k += 32) {
      A acc = 0;
      for (int t = 0; t < taps; ++t) {
        const long long src = neighbour(s, px, t, -1);  // the pixel whose tap t lands on p
        if (src >= 0)
          acc += load(weights + (px.b * taps + t) * HW + (src - px.b * HW)) *
                 load(grad_out + (px.b * s.K + k) * HW + (src - px.b * HW));
      }
      store(grad_value + (px.b * s.K + k) * HW + px.p, acc);
    }
  }
}

dim3 pixel_grid(const ArpShape& s) { return dim3(ceil_div(s.B * s.H * s.W, kWarpsPerBlock)); }
const dim3 kBlock(32, kWarpsPerBlock);

}  // namespace

cudaError_t adjacent_relation_propagation(DType dtype, const ArpShape& s, const void* feat,
                                          const void* value, void* out, void* weights, double scale,
                                          cudaStream_t stream) {
  if (s.B * s.H * s.W == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t smem = kWarpsPerBlock * s.kernel_size * s.kernel_size * sizeof(acc_t<T>);
    arp_forward_kernel<T><<<pixel_grid(s), kBlock, smem, stream>>>(
        s, static_cast<const T*>(feat), static_cast<const T*>(value), static_cast<T*>(out),
        static_cast<T*>(weights), scale);
  });
}

cudaError_t adjacent_relation_propagation_backward(DType dtype, const ArpShape& s,
                                                   const void* grad_out, const void* feat,
                                                   const void* value, const void* weights,
                                                   void* grad_feat, void* grad_value,
                                                   void* da_scratch, double scale,
                                                   cudaStream_t stream) {
  if (s.B * s.H * s.W == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (grad_feat != nullptr)
      arp_affinity_grad_kernel<T><<<pixel_grid(s), kBlock, 0, stream>>>(
          s, static_cast<const T*>(grad_out), static_cast<const T*>(value),
          static_cast<const T*>(weights), static_cast<acc_t<T>*>(da_scratch), scale);
    arp_gather_grad_kernel<T><<<pixel_grid(s), kBlock, 0, stream>>>(
        s, static_cast<const T*>(grad_out), static_cast<const T*>(feat),
        static_cast<const T*>(weights), static_cast<const acc_t<T>*>(da_scratch),
        static_cast<T*>(grad_feat), static_cast<T*>(grad_value));
  });
}

}  // namespace busseg::cuda
