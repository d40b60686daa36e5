// busseg::cross_layer_alignment_loss (RA-BUSSeg CRA; docs/ops.md), CUDA kernels: the row kernels
// of the blocked driver (common/cra_driver.h), run on one block of pixel rows at a time. Each
// pixel row gets one warp (lanes over the M proxies): log-sum-exp of every layer, the L-1 KL
// terms; backward recomputes the probabilities from the logits and the saved log-sum-exp and
// writes every logit gradient once.
#include <cmath>

#include "common/cuda.cuh"
#include "cross_layer_alignment_loss/cuda.h"

namespace busseg::cuda {
namespace {

constexpr int kRowWarps = 8;

template <typename T>
__device__ __forceinline__ acc_t<T> warp_log_sum_exp(const T* z, long long M, int lane) {
  using A = acc_t<T>;
  A zmax = -positive_inf<A>();
  for (long long m = lane; m < M; m += 32) zmax = nan_max(zmax, load(z + m));
  for (int o = 16; o > 0; o >>= 1) zmax = nan_max(zmax, __shfl_xor_sync(0xffffffffu, zmax, o));
  if (isinf(zmax)) return zmax;  // all -inf, or +inf present: no finite shift
  A sum = 0;
  for (long long m = lane; m < M; m += 32) sum += exp(load(z + m) - zmax);
  return zmax + log(warp_sum(sum));
}

// Term of KL(q || p) at one proxy, 0 * log 0 = 0 as in KLDivLoss (NaN still propagates).
template <typename A>
__device__ __forceinline__ A kl_term(A q, A log_q, A log_p_eps) {
  return (q > 0 || q != q) ? q * (log_q - log_p_eps) : A(0);
}

template <typename T>
__global__ void __launch_bounds__(32 * kRowWarps)
    align_forward_kernel(AlignShape s, const T* __restrict__ logits, double eps,
                         acc_t<T>* __restrict__ lse, acc_t<T>* __restrict__ row_loss) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const long long r = static_cast<long long>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (r >= s.R) return;  // the whole warp leaves together
  A row_lse[kMaxAlignLayers];
  for (int l = 0; l < s.L; ++l) {
    row_lse[l] = warp_log_sum_exp(logits + (l * s.R + r) * s.M, s.M, lane);
    if (lane == 0) lse[l * s.R + r] = row_lse[l];
  }
  A total = 0;
  for (int l = 0; l + 1 < s.L; ++l) {
    const T* zp = logits + (l * s.R + r) * s.M;
    const T* zq = logits + ((l + 1) * s.R + r) * s.M;
    for (long long m = lane; m < s.M; m += 32) {
      const A log_q = load(zq + m) - row_lse[l + 1];
      total +=
          kl_term(exp(log_q), log_q, log(exp(load(zp + m) - row_lse[l]) + static_cast<A>(eps)));
    }
  }
  total = warp_sum(total);
  if (lane == 0) row_loss[r] = total;
}

// Pair (input P_l = p, target P_{l+1} = q): u = log q - log(p + eps), h = -q / (p + eps).
// d/dz_{l+1} = q (u - <q, u>),  d/dz_l = p (h - <p, h>).
template <typename T>
__global__ void __launch_bounds__(32 * kRowWarps)
    align_backward_kernel(AlignShape s, const T* __restrict__ grad_loss,
                          const T* __restrict__ logits, const acc_t<T>* __restrict__ lse,
                          double eps, double norm, T* __restrict__ grad) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const long long r = static_cast<long long>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (r >= s.R) return;
  const A e = static_cast<A>(eps);
  A row_lse[kMaxAlignLayers], qu[kMaxAlignLayers], ph[kMaxAlignLayers];
  for (int l = 0; l < s.L; ++l) row_lse[l] = lse[l * s.R + r];
  for (int l = 0; l + 1 < s.L; ++l) {
    const T* zp = logits + (l * s.R + r) * s.M;
    const T* zq = logits + ((l + 1) * s.R + r) * s.M;
    A sum_qu = 0, sum_ph = 0;
    for (long long m = lane; m < s.M; m += 32) {
      const A p = exp(load(zp + m) - row_lse[l]);
      const A log_q = load(zq + m) - row_lse[l + 1], q = exp(log_q);
      sum_qu += kl_term(q, log_q, log(p + e));
      sum_ph -= p * q / (p + e);
    }
    qu[l] = warp_sum(sum_qu);
    ph[l] = warp_sum(sum_ph);
  }
  const A coef = load(grad_loss) * static_cast<A>(norm);
  for (int l = 0; l < s.L; ++l) {
    const T* z = logits + (l * s.R + r) * s.M;
    for (long long m = lane; m < s.M; m += 32) {
      const A log_x = load(z + m) - row_lse[l], x = exp(log_x);
      A g = 0;
      if (l > 0) {  // layer l is the target of pair l-1
        const A p = exp(load(logits + ((l - 1) * s.R + r) * s.M + m) - row_lse[l - 1]);
        const A u = (x > 0 || x != x) ? log_x - log(p + e) : A(0);
        g += x * (u - qu[l - 1]);
      }
      if (l + 1 < s.L) {  // layer l is the input of pair l
        const A q = exp(load(logits + ((l + 1) * s.R + r) * s.M + m) - row_lse[l + 1]);
        g += x * (-q / (x + e) - ph[l]);
      }
      store(grad + (l * s.R + r) * s.M + m, coef * g);
    }
  }
}
}  // namespace

cudaError_t cross_layer_alignment_loss_rows(DType dtype, const AlignShape& s, const void* logits,
                                            double eps, void* lse, void* row_loss,
                                            cudaStream_t stream) {
  if (s.R == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    align_forward_kernel<T><<<ceil_div(s.R, kRowWarps), 32 * kRowWarps, 0, stream>>>(
        s, static_cast<const T*>(logits), eps, static_cast<acc_t<T>*>(lse),
        static_cast<acc_t<T>*>(row_loss));
  });
}

cudaError_t cross_layer_alignment_loss_rows_backward(DType dtype, const AlignShape& s,
                                                     const void* grad_loss, const void* logits,
                                                     const void* lse, double eps, double norm,
                                                     void* grad_logits, cudaStream_t stream) {
  if (s.R == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    align_backward_kernel<T><<<ceil_div(s.R, kRowWarps), 32 * kRowWarps, 0, stream>>>(
        s, static_cast<const T*>(grad_loss), static_cast<const T*>(logits),
        static_cast<const acc_t<T>*>(lse), eps, norm, static_cast<T*>(grad_logits));
  });
}

}  // namespace busseg::cuda
