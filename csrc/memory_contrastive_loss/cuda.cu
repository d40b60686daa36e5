// busseg::memory_contrastive_loss (PH-Net Eq. 15; docs/ops.md), CUDA kernels: the epilogues of the
// similarity tiles that cuBLAS forms (memory_contrastive_loss/cuda_binding.cpp). Each reads its
// tile once and writes what the next product needs once: a block of 256 threads owns a row at a
// time with the whole row in registers (32 values a thread), and a persistent grid keeps each
// thread's 32 column classes in registers across the rows it visits.
#include <algorithm>
#include <climits>

#include "common/cuda.cuh"
#include "memory_contrastive_loss/cuda.h"

namespace busseg::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = static_cast<int>(kContrastiveMaxCols / kThreads);
constexpr int kBlocksPerSm = 3;  // the float epilogues fit three (80 registers)

// Block-wide max (NaN-propagating) or sum of v; every thread gets the result, summed in the same
// order by each (deterministic). The leading barrier frees the scratch of an earlier call.
template <bool kMax, typename A>
__device__ __forceinline__ A block_all_reduce(A v, A* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    const A w = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? nan_max(v, w) : v + w;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  A r = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) r = kMax ? nan_max(r, scratch[w]) : r + scratch[w];
  return r;
}

// This thread's columns j = threadIdx.x + k * kThreads: their classes (INT_MIN past the tile).
__device__ __forceinline__ void column_keys(const ContrastiveTile& t, int (&key)[kPerThread]) {
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const long long j = threadIdx.x + static_cast<long long>(k) * kThreads;
    key[k] = j < t.cols ? t.negative_keys[j] : INT_MIN;
  }
}

// weights (and grad below) may be sim itself: each thread reads its values of a row before it
// writes them (hence no __restrict__ on either).
template <typename A, typename W>
__global__ void __launch_bounds__(kThreads)
    softmax_tile_kernel(const A* sim, ContrastiveTile t, A* __restrict__ m, A* __restrict__ s,
                        A inv_tau, W* weights, A* __restrict__ alpha) {
  __shared__ A scratch[kThreads / 32];
  int key[kPerThread];
  column_keys(t, key);
  for (long long row = blockIdx.x; row < t.rows; row += gridDim.x) {
    const int anchor = t.anchor_keys[row];  // the same for the whole block
    W* w_row = weights ? weights + row * t.cols : nullptr;
    if (anchor < 0) {  // ignored anchor: no weights, its running state untouched
      if (w_row) {
#pragma unroll
        for (int k = 0; k < kPerThread; ++k)
          if (key[k] != INT_MIN) store(w_row + threadIdx.x + k * kThreads, A(0));
      }
      if (alpha && threadIdx.x == 0) alpha[row] = A(1);
      continue;
    }
    const A* r = sim + row * t.cols;
    A x[kPerThread];
    A local = -positive_inf<A>();
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const bool counted = key[k] != INT_MIN && key[k] != anchor;
      x[k] = counted ? r[threadIdx.x + k * kThreads] * inv_tau : -positive_inf<A>();
      local = nan_max(local, x[k]);
    }
    const A m_old = m[row];
    const A m_new = nan_max(m_old, block_all_reduce<true>(local, scratch));
    A sum = 0;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const A p = exp(x[k] - m_new);  // 0 where not counted (x = -inf)
      sum += p;
      if (w_row && key[k] != INT_MIN) store(w_row + threadIdx.x + k * kThreads, p);
    }
    sum = block_all_reduce<false>(sum, scratch);
    if (threadIdx.x == 0) {
      const A rescale = exp(m_old - m_new);
      s[row] = s[row] * rescale + sum;
      m[row] = m_new;
      if (alpha) alpha[row] = rescale;
    }
  }
}

template <typename A, typename W>
__global__ void __launch_bounds__(kThreads)
    grad_tile_kernel(const A* sim, ContrastiveTile t, const A* __restrict__ lse,
                     const A* __restrict__ coef, A inv_tau, W* grad) {
  int key[kPerThread];
  column_keys(t, key);
  for (long long row = blockIdx.x; row < t.rows; row += gridDim.x) {
    const int anchor = t.anchor_keys[row];
    const A c = coef[row], l = lse[row];
    const A* r = sim + row * t.cols;
    W* g = grad + row * t.cols;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      if (key[k] == INT_MIN) continue;
      const int j = threadIdx.x + k * kThreads;
      store(g + j, (c != A(0) && key[k] != anchor) ? c * exp(r[j] * inv_tau - l) : A(0));
    }
  }
}

// A persistent grid: kBlocksPerSm blocks per SM, at most one per row.
unsigned grid_for(long long rows) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return static_cast<unsigned>(
      std::min<long long>(rows, static_cast<long long>(sms) * kBlocksPerSm));
}

bool tile_ok(const ContrastiveTile& t) { return t.cols <= kContrastiveMaxCols; }

// Calls f(W{}) for the storage type W of a float tile's weights: float, half or bfloat16.
template <typename F>
cudaError_t dispatch_float_weights(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32:
      f(float{});
      break;
    case DType::f16:
      f(__half{});
      break;
    case DType::bf16:
      f(__nv_bfloat16{});
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t memory_contrastive_loss_softmax_tile(DType sim_dtype, const void* sim,
                                                 const ContrastiveTile& tile, void* m, void* s,
                                                 double inv_tau, DType weights_dtype, void* weights,
                                                 void* alpha, cudaStream_t stream) {
  if (!tile_ok(tile)) return cudaErrorInvalidValue;
  if (tile.rows == 0 || tile.cols == 0) return cudaSuccess;
  const unsigned blocks = grid_for(tile.rows);
  if (sim_dtype == DType::f64) {
    if (weights && weights_dtype != DType::f64) return cudaErrorInvalidValue;
    softmax_tile_kernel<double, double><<<blocks, kThreads, 0, stream>>>(
        static_cast<const double*>(sim), tile, static_cast<double*>(m), static_cast<double*>(s),
        inv_tau, static_cast<double*>(weights), static_cast<double*>(alpha));
    return cudaGetLastError();
  }
  if (sim_dtype != DType::f32) return cudaErrorInvalidValue;
  return dispatch_float_weights(weights_dtype, [&](auto tag) {
    using W = decltype(tag);
    softmax_tile_kernel<float, W><<<blocks, kThreads, 0, stream>>>(
        static_cast<const float*>(sim), tile, static_cast<float*>(m), static_cast<float*>(s),
        static_cast<float>(inv_tau), static_cast<W*>(weights), static_cast<float*>(alpha));
  });
}

cudaError_t memory_contrastive_loss_grad_tile(DType sim_dtype, const void* sim,
                                              const ContrastiveTile& tile, const void* lse,
                                              const void* coef, double inv_tau, DType grad_dtype,
                                              void* grad, cudaStream_t stream) {
  if (!tile_ok(tile)) return cudaErrorInvalidValue;
  if (tile.rows == 0 || tile.cols == 0) return cudaSuccess;
  const unsigned blocks = grid_for(tile.rows);
  if (sim_dtype == DType::f64) {
    if (grad_dtype != DType::f64) return cudaErrorInvalidValue;
    grad_tile_kernel<double, double><<<blocks, kThreads, 0, stream>>>(
        static_cast<const double*>(sim), tile, static_cast<const double*>(lse),
        static_cast<const double*>(coef), inv_tau, static_cast<double*>(grad));
    return cudaGetLastError();
  }
  if (sim_dtype != DType::f32) return cudaErrorInvalidValue;
  return dispatch_float_weights(grad_dtype, [&](auto tag) {
    using W = decltype(tag);
    grad_tile_kernel<float, W><<<blocks, kThreads, 0, stream>>>(
        static_cast<const float*>(sim), tile, static_cast<const float*>(lse),
        static_cast<const float*>(coef), static_cast<float>(inv_tau), static_cast<W*>(grad));
  });
}

}  // namespace busseg::cuda
