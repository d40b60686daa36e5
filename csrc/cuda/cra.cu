// Cross-layer relation alignment (SPEC §2), CUDA kernels.
//
// Greedy sampling runs all M steps in one launch with one block per image (farthest-point-
// sampling style): per step the block stages the chosen pixel's feature row in shared memory,
// one warp per pixel computes its similarity (lanes over channels, coalesced), updates the
// cumulative similarity and its running max in global scratch, and a block arg-min picks the
// next proxy. Any HW works; parallelism is B blocks, so small batches of large maps leave most
// SMs idle (no cross-block scheme yet).
//
// The loss kernels give each pixel row one warp (lanes over the M proxies): log-sum-exp of every
// layer, the L-1 KL terms; backward recomputes the probabilities from the logits and the saved
// log-sum-exp and writes every logit gradient once.
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/cra.h"

namespace busseg::cuda {
namespace {

constexpr int kGreedyThreads = 512;
constexpr int kRowWarps = 8;

template <typename A> __device__ __forceinline__ A nan_max(A a, A b) {
  return (a != a || a >= b) ? a : b;
}
template <typename A> __device__ __forceinline__ A positive_inf() { return A(INFINITY); }

template <typename T>
__global__ void __launch_bounds__(kGreedyThreads)
greedy_kernel(long long HW, long long C, long long M, const T* __restrict__ feat,
              const long long* __restrict__ first, double scale, acc_t<T>* __restrict__ cumulative,
              acc_t<T>* __restrict__ score, unsigned char* __restrict__ chosen,
              long long* __restrict__ out) {
  using A = acc_t<T>;
  extern __shared__ unsigned char smem[];
  A* row = reinterpret_cast<A*>(smem);  // feature row of the proxy just chosen
  __shared__ long long next;
  const long long b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  feat += b * HW * C;
  cumulative += b * HW;
  score += b * HW;
  chosen += b * HW;
  out += b * M;
  for (long long j = threadIdx.x; j < HW; j += blockDim.x) {
    cumulative[j] = 0;
    score[j] = -positive_inf<A>();
    chosen[j] = 0;
  }
  if (threadIdx.x == 0) next = first[b];
  __syncthreads();
  for (long long m = 0; m < M; ++m) {
    const long long s = next;
    if (threadIdx.x == 0) out[m] = s, chosen[s] = 1;
    if (m + 1 == M) break;
    for (long long c = threadIdx.x; c < C; c += blockDim.x) row[c] = load(feat + s * C + c);
    __syncthreads();  // row and chosen[s] visible to the block; everyone has read `next`
    A best_v = 0;
    long long best_i = -1;
    for (long long j = warp; j < HW; j += warps) {
      A part = 0;
      for (long long c = lane; c < C; c += 32) part += row[c] * load(feat + j * C + c);
      part = warp_sum(part);
      if (lane == 0) {
        const A cj = cumulative[j] + static_cast<A>(scale) * part;
        const A sj = nan_max(score[j], cj);
        cumulative[j] = cj;
        score[j] = sj;
        const A key = sj != sj ? positive_inf<A>() : sj;  // NaN counts as +inf
        if (!chosen[j] && argmin_better(key, j, best_v, best_i)) best_v = key, best_i = j;
      }
    }
    block_argmin(best_v, best_i);
    if (threadIdx.x == 0) next = best_i;  // M <= HW: an unchosen pixel always exists
    __syncthreads();
  }
}

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
template <typename A> __device__ __forceinline__ A kl_term(A q, A log_q, A log_p_eps) {
  return (q > 0 || q != q) ? q * (log_q - log_p_eps) : A(0);
}

template <typename T>
__global__ void align_forward_kernel(AlignShape s, const T* __restrict__ logits, double eps,
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
      total += kl_term(exp(log_q), log_q, log(exp(load(zp + m) - row_lse[l]) + static_cast<A>(eps)));
    }
  }
  total = warp_sum(total);
  if (lane == 0) row_loss[r] = total;
}

// Pair (input P_l = p, target P_{l+1} = q): u = log q - log(p + eps), h = -q / (p + eps).
// d/dz_{l+1} = q (u - <q, u>),  d/dz_l = p (h - <p, h>).
template <typename T>
__global__ void align_backward_kernel(AlignShape s, const T* __restrict__ grad_loss,
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

cudaError_t cra_greedy_sampling(DType dtype, long long B, long long HW, long long C, long long M,
                                const void* feat, const long long* first, double scale,
                                void* acc_scratch, unsigned char* chosen_scratch, long long* out,
                                cudaStream_t stream) {
  if (B == 0 || M == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    A* cumulative = static_cast<A*>(acc_scratch);
    const size_t smem = static_cast<size_t>(C) * sizeof(A);
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(greedy_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem));
    greedy_kernel<T><<<static_cast<unsigned>(B), kGreedyThreads, smem, stream>>>(
        HW, C, M, static_cast<const T*>(feat), first, scale, cumulative, cumulative + B * HW,
        chosen_scratch, out);
  });
}

cudaError_t cra_align_forward(DType dtype, const AlignShape& s, const void* logits, double eps,
                              void* lse, void* row_loss, cudaStream_t stream) {
  if (s.R == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    align_forward_kernel<T><<<ceil_div(s.R, kRowWarps), 32 * kRowWarps, 0, stream>>>(
        s, static_cast<const T*>(logits), eps, static_cast<acc_t<T>*>(lse),
        static_cast<acc_t<T>*>(row_loss));
  });
}

cudaError_t cra_align_backward(DType dtype, const AlignShape& s, const void* grad_loss,
                               const void* logits, const void* lse, double eps, double norm,
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
