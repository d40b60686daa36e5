// busseg::memory_contrastive_loss (PH-Net Eq. 15; docs/ops.md), CUDA kernels: the row-wise tile
// kernels of the shared tiled driver (common/contrastive_driver.h; the tiles themselves come from
// cuBLAS).
#include <algorithm>

#include "common/cuda.cuh"
#include "memory_contrastive_loss/cuda.h"

namespace busseg::cuda {
namespace {

constexpr int kThreads = 256;

// One warp per row: the row's masked max, then its sum of exponentials.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    lse_update_kernel(const A* __restrict__ sim, long long rows, long long cols,
                      const long long* __restrict__ ya, const long long* __restrict__ yn,
                      A* __restrict__ m, A* __restrict__ s, A inv_tau) {
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
__global__ void __launch_bounds__(kThreads)
    grad_tile_kernel(A* __restrict__ sim, long long rows, long long cols,
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

cudaError_t memory_contrastive_loss_lse_update(DType dtype, const void* sim, long long rows,
                                               long long cols, const long long* ya,
                                               const long long* yn, void* m, void* s,
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

cudaError_t memory_contrastive_loss_grad_tile(DType dtype, void* sim, long long rows,
                                              long long cols, const long long* ya,
                                              const long long* yn, const void* lse,
                                              const void* coef, double inv_tau,
                                              cudaStream_t stream) {
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
