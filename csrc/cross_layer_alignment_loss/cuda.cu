// busseg::cross_layer_alignment_loss (RA-BUSSeg CRA; docs/ops.md), CUDA kernels: the row kernels
// of the blocked driver (common/cra_driver.h), run on one block of pixel rows at a time. Each
// pixel row gets one warp (lanes over the M proxies): log-sum-exp of every layer, the L-1 KL
// terms; backward recomputes the probabilities from the logits and the saved log-sum-exp and
// writes every logit gradient once. Both slide over the layers with the per-layer row sums in
// scalars (arrays of them indexed by the layer sat in local memory), so any L is taken.
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

// A minimum of one resident block: by default ptxas held the double instance to 64 registers and
// spilled.
template <typename T>
__global__ void __launch_bounds__(32 * kRowWarps, 1)
    align_forward_kernel(AlignShape s, const T* __restrict__ logits, double eps,
                         acc_t<T>* __restrict__ lse, acc_t<T>* __restrict__ row_loss) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const long long r = static_cast<long long>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (r >= s.R) return;  // the whole warp leaves together
  const A e = static_cast<A>(eps);
  A lse_p = warp_log_sum_exp(logits + r * s.M, s.M, lane);  // layer l-1 of the pair
  if (lane == 0) lse[r] = lse_p;
  A total = 0;
  for (int l = 1; l < s.L; ++l) {
    const T* zp = logits + ((l - 1) * s.R + r) * s.M;
    const T* zq = logits + (l * s.R + r) * s.M;
    const A lse_q = warp_log_sum_exp(zq, s.M, lane);
    if (lane == 0) lse[l * s.R + r] = lse_q;
    for (long long m = lane; m < s.M; m += 32) {
      const A log_q = load(zq + m) - lse_q;
      total += kl_term(exp(log_q), log_q, log(exp(load(zp + m) - lse_p) + e));
    }
    lse_p = lse_q;
  }
  total = warp_sum(total);
  if (lane == 0) row_loss[r] = total;
}

// Logits of type T (float or double), gradients and grad_loss of the inputs' type G.
// Pair (input P_l = p, target P_{l+1} = q): u = log q - log(p + eps), h = -q / (p + eps).
// d/dz_{l+1} = q (u - <q, u>),  d/dz_l = p (h - <p, h>). A sliding window over the layers: per
// layer a pass for the row sums of the pair it is the input of, then a pass writing its gradient.
template <typename T, typename G>
__global__ void __launch_bounds__(32 * kRowWarps)
    align_backward_kernel(AlignShape s, const G* __restrict__ grad_loss,
                          const T* __restrict__ logits, const acc_t<T>* __restrict__ lse,
                          double eps, double norm, G* __restrict__ grad) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const long long r = static_cast<long long>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (r >= s.R) return;
  const A e = static_cast<A>(eps);
  const A coef = load(grad_loss) * static_cast<A>(norm);
  A lse_prev = 0, lse_cur = lse[r];
  A qu_prev = 0;  // <q, u> of pair l-1
  for (int l = 0; l < s.L; ++l) {
    const bool input = l + 1 < s.L;  // layer l is the input of pair l
    const A lse_next = input ? lse[(l + 1) * s.R + r] : A(0);
    const T* z = logits + (l * s.R + r) * s.M;
    const T* z_prev = l > 0 ? logits + ((l - 1) * s.R + r) * s.M : z;
    const T* z_next = input ? logits + ((l + 1) * s.R + r) * s.M : z;
    A qu = 0, ph = 0;
    if (input) {
      for (long long m = lane; m < s.M; m += 32) {
        const A p = exp(load(z + m) - lse_cur);
        const A log_q = load(z_next + m) - lse_next, q = exp(log_q);
        qu += kl_term(q, log_q, log(p + e));
        ph -= p * q / (p + e);
      }
      qu = warp_sum(qu);
      ph = warp_sum(ph);
    }
    for (long long m = lane; m < s.M; m += 32) {
      const A log_x = load(z + m) - lse_cur, x = exp(log_x);
      A g = 0;
      if (l > 0) {  // layer l is the target of pair l-1
        const A p = exp(load(z_prev + m) - lse_prev);
        const A u = (x > 0 || x != x) ? log_x - log(p + e) : A(0);
        g += x * (u - qu_prev);
      }
      if (input) {
        const A q = exp(load(z_next + m) - lse_next);
        g += x * (-q / (x + e) - ph);
      }
      store(grad + (l * s.R + r) * s.M + m, coef * g);
    }
    qu_prev = qu;
    lse_prev = lse_cur;
    lse_cur = lse_next;
  }
}
}  // namespace

cudaError_t cross_layer_alignment_loss_rows(DType dtype, const AlignShape& s, const void* logits,
                                            double eps, void* lse, void* row_loss,
                                            cudaStream_t stream) {
  if (s.R == 0) return cudaSuccess;
  const int blocks = ceil_div(s.R, kRowWarps);
  if (dtype == DType::f64)
    align_forward_kernel<double><<<blocks, 32 * kRowWarps, 0, stream>>>(
        s, static_cast<const double*>(logits), eps, static_cast<double*>(lse),
        static_cast<double*>(row_loss));
  else if (dtype == DType::f32)
    align_forward_kernel<float><<<blocks, 32 * kRowWarps, 0, stream>>>(
        s, static_cast<const float*>(logits), eps, static_cast<float*>(lse),
        static_cast<float*>(row_loss));
  else
    return cudaErrorInvalidValue;  // the binding forms half inputs' logits in float32
  return cudaGetLastError();
}

cudaError_t cross_layer_alignment_loss_rows_backward(DType logits_dtype, DType grad_dtype,
                                                     const AlignShape& s, const void* grad_loss,
                                                     const void* logits, const void* lse,
                                                     double eps, double norm, void* grad_logits,
                                                     cudaStream_t stream) {
  if (s.R == 0) return cudaSuccess;
  const int blocks = ceil_div(s.R, kRowWarps);
  if (logits_dtype == DType::f64) {
    if (grad_dtype != DType::f64) return cudaErrorInvalidValue;
    align_backward_kernel<double, double><<<blocks, 32 * kRowWarps, 0, stream>>>(
        s, static_cast<const double*>(grad_loss), static_cast<const double*>(logits),
        static_cast<const double*>(lse), eps, norm, static_cast<double*>(grad_logits));
    return cudaGetLastError();
  }
  if (logits_dtype != DType::f32) return cudaErrorInvalidValue;
  const auto launch = [&](auto tag) {
    using G = decltype(tag);
    align_backward_kernel<float, G><<<blocks, 32 * kRowWarps, 0, stream>>>(
        s, static_cast<const G*>(grad_loss), static_cast<const float*>(logits),
        static_cast<const float*>(lse), eps, norm, static_cast<G*>(grad_logits));
    return cudaGetLastError();
  };
  switch (grad_dtype) {
    case DType::f32:
      return launch(float{});
    case DType::f16:
      return launch(__half{});
    case DType::bf16:
      return launch(__nv_bfloat16{});
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace busseg::cuda
