// busseg::greedy_proxy_sampling (RA-BUSSeg; docs/ops.md), CUDA kernels.
//
// Greedy sampling runs all M steps in one launch (farthest-point-sampling style). Each image is
// split into P contiguous pixel chunks, one block each; per step a block stages the chosen pixel's
// feature row in shared memory, one warp per pixel computes its similarity (lanes over channels,
// coalesced), updates the cumulative similarity and its running max in global scratch (each
// block touches only its own pixels' state), and a block arg-min picks the chunk's candidate.
// P = 1: that candidate is the next proxy. P >= 2 (few large maps, where one block per image
// would leave most SMs idle): a cooperative launch; blocks post their candidates to global slots,
// one grid barrier, and every block reduces its image's slots in the same way, so all agree on
// the next proxy. Both use the same per-pixel arithmetic, hence the same proxies.
// greedy_proxy_sampling_blocks_per_image holds the choice of P.
#include <cooperative_groups.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "common/cuda.cuh"
#include "greedy_proxy_sampling/cuda.h"

namespace busseg::cuda {
namespace {

constexpr int kGreedyThreads = 512;

// Greedy sampling with P blocks per image (grid B*P); block p owns pixels [p*HW/P, (p+1)*HW/P).
// kCooperative (P >= 2) needs a cooperative launch: all blocks resident, grid barriers.
template <typename T, bool kCooperative>
__global__ void __launch_bounds__(kGreedyThreads)
    greedy_kernel(long long HW, long long C, long long M, long long P, const T* __restrict__ feat,
                  const long long* __restrict__ first, double scale,
                  acc_t<T>* __restrict__ cumulative, acc_t<T>* __restrict__ score,
                  unsigned char* __restrict__ chosen, long long* slot_i, acc_t<T>* slot_v,
                  long long* __restrict__ out) {
  using A = acc_t<T>;
  extern __shared__ unsigned char smem[];
  A* row = reinterpret_cast<A*>(smem);  // feature row of the proxy just chosen
  __shared__ long long next;
  const long long b = blockIdx.x / P, p = blockIdx.x % P;
  const long long begin = p * HW / P, end = (p + 1) * HW / P;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  feat += b * HW * C;
  cumulative += b * HW;
  score += b * HW;
  chosen += b * HW;
  out += b * M;
  for (long long j = begin + threadIdx.x; j < end; j += blockDim.x) {
    cumulative[j] = 0;
    score[j] = -positive_inf<A>();
    chosen[j] = 0;
  }
  if (threadIdx.x == 0) next = first[b];
  __syncthreads();
  for (long long m = 0; m < M; ++m) {
    const long long s = next;
    if (threadIdx.x == 0) {
      if (p == 0) out[m] = s;
      if (s >= begin && s < end) chosen[s] = 1;  // only the owner touches a pixel's state
    }
    if (m + 1 == M) break;  // the same step in every block: barrier counts match
    for (long long c = threadIdx.x; c < C; c += blockDim.x) row[c] = load(feat + s * C + c);
    __syncthreads();  // row and chosen[s] visible to the block; everyone has read `next`
    A best_v = 0;
    long long best_i = -1;
    for (long long j = begin + warp; j < end; j += warps) {
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
    block_argmin(best_v, best_i);  // ends with a barrier: `row` may be overwritten next step
    if constexpr (kCooperative) {
      // One candidate slot per block, double-buffered by step parity: a block already writing
      // step m+1's slot cannot clobber step m's that a slower block is still reading, and
      // writing step m+2's needs the next grid barrier, which waits for that slower block.
      long long* const step_i = slot_i + (m & 1) * gridDim.x;
      A* const step_v = slot_v + (m & 1) * gridDim.x;
      if (threadIdx.x == 0) step_i[blockIdx.x] = best_i, step_v[blockIdx.x] = best_v;
      cooperative_groups::this_grid().sync();  // also makes the slots visible grid-wide
      if (warp == 0) {
        // Distinct indices and NaN-free keys: the (key, index) minimum is unique, so every
        // block of the image gets the same winner whatever the reduction order.
        best_v = 0, best_i = -1;
        for (long long q = b * P + lane; q < (b + 1) * P; q += 32) {
          const A v = step_v[q];
          const long long i = step_i[q];
          if (argmin_better(v, i, best_v, best_i)) best_v = v, best_i = i;
        }
        warp_argmin(best_v, best_i);
      }
    }
    if (threadIdx.x == 0) next = best_i;  // M <= HW: an unchosen pixel always exists
    __syncthreads();
  }
}

// Workspace of greedy sampling, largest alignment first: candidate slots (index, then value) for
// two step parities, then per pixel the cumulative similarity, its running max, the chosen flag.
struct GreedyLayout {
  size_t slot_v, cumulative, score, chosen, bytes;
};
GreedyLayout greedy_layout(DType dtype, long long B, long long HW, long long P) {
  const size_t acc = dtype == DType::f64 ? sizeof(double) : sizeof(float);
  const size_t slots = 2 * static_cast<size_t>(B * P), pixels = static_cast<size_t>(B * HW);
  GreedyLayout l;
  l.slot_v = slots * sizeof(long long);
  l.cumulative = l.slot_v + slots * acc;
  l.score = l.cumulative + pixels * acc;
  l.chosen = l.score + pixels * acc;
  l.bytes = l.chosen + pixels;
  return l;
}

// Dynamic shared memory of greedy_kernel (the proxy's feature row), opted in above the default.
template <typename T, bool kCooperative>
size_t greedy_smem(long long C) {
  const size_t smem = static_cast<size_t>(C) * sizeof(acc_t<T>);
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(greedy_kernel<T, kCooperative>,
                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  return smem;
}

// Fewest pixels per block worth a grid barrier per step (4 pixels per warp).
constexpr long long kMinGreedyChunk = 4 * kGreedyThreads / 32;

}  // namespace

// The dispatch heuristic. One block per image when the batch alone gives every SM an image, the
// map is too small to split, or the device has no cooperative launch (no grid barrier). Otherwise
// as many blocks per image as the GPU holds at once (a cooperative launch fails unless every block
// is resident: the occupancy calculator's blocks per SM times the SM count), but no chunk under
// kMinGreedyChunk pixels.
cudaError_t greedy_proxy_sampling_blocks_per_image(DType dtype, long long B, long long HW,
                                                   long long C, long long* blocks_per_image) {
  *blocks_per_image = 1;
  int device = 0, cooperative = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (!cooperative || B >= sms || HW < 2 * kMinGreedyChunk) return cudaGetLastError();
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, greedy_kernel<T, true>, kGreedyThreads,
                                                  greedy_smem<T, true>(C));
    *blocks_per_image =
        std::max(1LL, std::min(per_sm * static_cast<long long>(sms) / B, HW / kMinGreedyChunk));
  });
}

size_t greedy_proxy_sampling_workspace_bytes(DType dtype, long long B, long long HW,
                                             long long blocks_per_image) {
  return greedy_layout(dtype, B, HW, blocks_per_image).bytes;
}

cudaError_t greedy_proxy_sampling(DType dtype, long long B, long long HW, long long C, long long M,
                                  long long blocks_per_image, const void* feat,
                                  const long long* first, double scale, void* workspace,
                                  long long* out, cudaStream_t stream) {
  if (B == 0 || M == 0) return cudaSuccess;
  long long P = blocks_per_image;
  if (P < 1 || B * P > INT_MAX) return cudaErrorInvalidConfiguration;  // grid.x is 32-bit
  const GreedyLayout l = greedy_layout(dtype, B, HW, P);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* f = static_cast<const T*>(feat);
    long long* slot_i = reinterpret_cast<long long*>(ws);
    A* slot_v = reinterpret_cast<A*>(ws + l.slot_v);
    A* cumulative = reinterpret_cast<A*>(ws + l.cumulative);
    A* score = reinterpret_cast<A*>(ws + l.score);
    unsigned char* chosen = ws + l.chosen;
    const unsigned grid = static_cast<unsigned>(B * P);
    if (P == 1) {
      greedy_kernel<T, false><<<grid, kGreedyThreads, greedy_smem<T, false>(C), stream>>>(
          HW, C, M, P, f, first, scale, cumulative, score, chosen, slot_i, slot_v, out);
      return;
    }
    // Pointers to the kernel's parameters in order, each variable of the parameter's exact type.
    void* args[] = {&HW,         &C,     &M,      &P,      &f,      &first, &scale,
                    &cumulative, &score, &chosen, &slot_i, &slot_v, &out};
    cudaLaunchCooperativeKernel(greedy_kernel<T, true>, dim3(grid), dim3(kGreedyThreads), args,
                                greedy_smem<T, true>(C), stream);
  });
}

}  // namespace busseg::cuda
