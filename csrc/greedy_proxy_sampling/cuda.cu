// busseg::greedy_proxy_sampling (RA-BUSSeg; docs/ops.md), CUDA kernel: one persistent launch runs
// all M steps, each image split over P blocks that agree on each step's winner (a thread block
// cluster on sm_90, else a global barrier under a cooperative launch); docs/kernels.md says how.
//
// Every pixel's dot product is summed in one fixed order, whichever memory holds its features
// (channel c into partial sum c % 8, the eight added pairwise), so an image gives the same proxies
// alone or in any batch, on any GPU, whatever the plan.
#include <cooperative_groups.h>

#include <algorithm>
#include <climits>

#include "common/cuda.cuh"
#include "greedy_proxy_sampling/cuda.h"

namespace busseg::cuda {
namespace {

constexpr int kMaxThreads = 512;
// Largest cluster: 8 is portable, 16 needs the non-portable opt-in (H100 / H200 take it).
constexpr int kMaxCluster = 16;
// Each thread keeps this many channels of its first pixel in registers (float accumulation only:
// as many doubles would not fit beside the rest under kMaxThreads' register budget).
template <typename A>
constexpr int kRegChannels = sizeof(A) == 4 ? 48 : 0;
// Fewest multiply-adds per block and step worth splitting an image further (a split adds a
// cross-block agreement per step, about a microsecond).
constexpr long long kMinBlockWork = 65536;

__host__ __device__ constexpr long long round_up(long long v, long long to) {
  return (v + to - 1) / to * to;
}

struct GreedyArgs {
  const void* feat;  // (B, C, HW)
  const long long* first;
  long long* out;
  void* slot_v;                  // barrier: candidate values, 2 step parities x (B * P)
  int* slot_i;                   // barrier: candidate indices, likewise
  unsigned long long* arrivals;  // barrier: per image, arrivals so far (zeroed)
  int HW, C, M, P, cached, in_registers, stride;
  double scale;
};

// Eight consecutive values of q (shared memory, 16-byte aligned) in vector loads.
__device__ __forceinline__ void load8(const float* q, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(q)[0], b = reinterpret_cast<const float4*>(q)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const double* q, double (&v)[8]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const double2 d = reinterpret_cast<const double2*>(q)[k];
    v[2 * k] = d.x, v[2 * k + 1] = d.y;
  }
}

// A feature read from global memory every step: cached in L2 only (nothing to reuse in L1,
// which shares its storage with the large shared memory carve-out).
template <typename T>
__device__ __forceinline__ acc_t<T> load_streamed(const T* p) {
  return static_cast<acc_t<T>>(__ldcg(p));
}
template <>
__device__ __forceinline__ float load_streamed<__half>(const __half* p) {
  return __half2float(__ldcg(p));
}
template <>
__device__ __forceinline__ float load_streamed<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(__ldcg(p));
}

// acc[c % 8] += q[c] * x[(c - lo) * stride] for c in [lo, hi), lo a multiple of 8, in
// increasing c; `read` loads one feature (from shared or global memory) in the accumulation type.
template <typename A, typename T, typename Read>
__device__ __forceinline__ void accumulate(A (&acc)[8], const A* q, int lo, int hi, const T* x,
                                           size_t stride, Read read) {
  int c = lo;
#pragma unroll 1
  for (; c + 8 <= hi; c += 8, x += 8 * stride) {
    A qv[8];
    load8(q + c, qv);
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[k] = fma(qv[k], read(x + k * stride), acc[k]);
  }
#pragma unroll
  for (int k = 0; k < 7; ++k)
    if (c + k < hi) acc[k] = fma(q[c + k], read(x + k * stride), acc[k]);
}

template <typename T, GreedySync kSync>
__global__ void __launch_bounds__(kMaxThreads) greedy_kernel(GreedyArgs a) {
  using A = acc_t<T>;
  constexpr int R = kRegChannels<A>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int next;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, threads = blockDim.x;
  const int b = blockIdx.x / a.P, p = blockIdx.x % a.P;  // a cluster's rank of a 1-D grid: p
  const int begin = static_cast<int>(static_cast<long long>(p) * a.HW / a.P);
  const int end = static_cast<int>(static_cast<long long>(p + 1) * a.HW / a.P), n = end - begin;
  const int HW = a.HW, C = a.C, M = a.M, stride = a.stride;
  const T* f = static_cast<const T*>(a.feat) + static_cast<size_t>(b) * C * HW;
  long long* out = a.out + static_cast<size_t>(b) * M;

  const long long s0 = a.first[b];
  if (s0 < 0 || s0 >= HW) {  // the binding rejects these; never read out of bounds regardless
    if (p == 0)
      for (int m = tid; m < M; m += threads) out[m] = -1;
    return;  // every block of the image returns: no barrier waits for it
  }

  // Shared memory: q (the proxy's features, zero-padded to a multiple of 8), the running state,
  // the feature cache (channel-major rows of `stride` pixels), the chosen flags.
  const int Cq = static_cast<int>(round_up(C, 8));
  A* q = reinterpret_cast<A*>(smem);
  A* cumulative = q + Cq;
  A* score = cumulative + stride;
  T* cache = reinterpret_cast<T*>(score + stride);
  unsigned char* chosen =
      reinterpret_cast<unsigned char*>(cache + static_cast<size_t>(a.cached) * stride);
  for (int c = C + tid; c < Cq; c += threads) q[c] = 0;
  for (int j = tid; j < n; j += threads) {
    cumulative[j] = 0;
    score[j] = -positive_inf<A>();
    chosen[j] = 0;
  }
#pragma unroll 4
  for (int c = 0; c < a.cached; ++c)
    for (int j = tid; j < n; j += threads)
      cache[static_cast<size_t>(c) * stride + j] = f[static_cast<size_t>(c) * HW + begin + j];
  A reg[R > 0 ? R : 1];  // channels cached .. cached + in_registers of pixel begin + tid
#pragma unroll
  for (int r = 0; r < R; ++r)
    reg[r] = tid < n && r < a.in_registers
                 ? load(f + static_cast<size_t>(a.cached + r) * HW + begin + tid)
                 : A(0);
  if (tid == 0) next = static_cast<int>(s0);
  __syncthreads();

  const A scale = static_cast<A>(a.scale);
  for (int m = 0; m < M; ++m) {
    const int s = next;
    if (tid == 0) {
      if (p == 0) out[m] = s;
      if (s >= begin && s < end) chosen[s - begin] = 1;  // only the owner touches a pixel's state
    }
    if (m + 1 == M) break;  // the same step in every block: the agreements below stay paired
    for (int c = tid; c < C; c += threads) q[c] = load(f + static_cast<size_t>(c) * HW + s);
    __syncthreads();  // q and chosen[s] visible to the block; everyone has read `next`

    A best_v = 0;
    long long best_i = -1;
    for (int j = tid; j < n; j += threads) {
      A acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      accumulate(acc, q, 0, a.cached, cache + j, stride, [](const T* x) { return load(x); });
      int from = a.cached;
      if (j == tid) {  // the thread's first pixel: its next channels are in registers
#pragma unroll
        for (int r0 = 0; r0 < R; r0 += 8) {
          if (r0 >= a.in_registers) break;
          A qv[8];
          load8(q + a.cached + r0, qv);  // cached: a multiple of 8 here; q zero-padded to 8
#pragma unroll
          for (int k = 0; k < 8; ++k)
            if (r0 + k < a.in_registers) acc[k] = fma(qv[k], reg[r0 + k], acc[k]);
        }
        from += a.in_registers;
      }
      accumulate(acc, q, from, C, f + static_cast<size_t>(from) * HW + begin + j, HW,
                 [](const T* x) { return load_streamed(x); });
      const A dot =
          ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      const A cj = fma(scale, dot, cumulative[j]);
      const A sj = nan_max(score[j], cj);
      cumulative[j] = cj;
      score[j] = sj;
      const A key = sj != sj ? positive_inf<A>() : sj;  // NaN counts as +inf
      if (!chosen[j] && argmin_better(key, begin + j, best_v, best_i))
        best_v = key, best_i = begin + j;
    }
    block_argmin(best_v, best_i);  // in thread 0; ends with a barrier: q may be overwritten next

    // Candidates are distinct pixels with NaN-free keys: the (key, index) minimum is unique, so
    // every block of the image takes the same winner whatever the order it reduces them in.
    if constexpr (kSync == GreedySync::none) {
      if (tid == 0) next = static_cast<int>(best_i);  // M <= HW: an unchosen pixel always exists
    } else if constexpr (kSync == GreedySync::cluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      // Slots double-buffered by step parity: a block writes step m+2's slot only after the
      // barrier of step m+1, which every block reaches after reading step m's slots.
      __shared__ A cluster_v[2];  // this block's candidate per step parity
      __shared__ int cluster_i[2];
      cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
      if (tid == 0) cluster_v[m & 1] = best_v, cluster_i[m & 1] = static_cast<int>(best_i);
      cluster.sync();
      if (warp == 0) {
        A v = 0;
        long long i = -1;
        if (lane < a.P) {  // P <= kMaxCluster <= 32
          v = *cluster.map_shared_rank(&cluster_v[m & 1], lane);
          i = *cluster.map_shared_rank(&cluster_i[m & 1], lane);
        }
        warp_argmin(v, i);
        if (lane == 0) next = static_cast<int>(i);
      }
#else
      __trap();  // the plan picks clusters only for sm_90 code
#endif
    } else {
      // Slots double-buffered by step parity, as for clusters. Thread 0 publishes the block's
      // candidate and waits until every block of the image has published (a counter of arrivals
      // per image that only grows); the slots are then read from L2 (never a stale L1 line).
      A* step_v = static_cast<A*>(a.slot_v) + static_cast<size_t>(m & 1) * gridDim.x;
      int* step_i = a.slot_i + static_cast<size_t>(m & 1) * gridDim.x;
      if (tid == 0) {
        step_v[blockIdx.x] = best_v;
        step_i[blockIdx.x] = static_cast<int>(best_i);
        __threadfence();
        atomicAdd(a.arrivals + b, 1ULL);
        const unsigned long long all = static_cast<unsigned long long>(m + 1) * a.P;
        while (*static_cast<volatile unsigned long long*>(a.arrivals + b) < all) __nanosleep(32);
        __threadfence();
      }
      __syncthreads();
      if (warp == 0) {
        A v = 0;
        long long i = -1;
        for (int k = b * a.P + lane; k < (b + 1) * a.P; k += 32) {
          const A ov = __ldcg(step_v + k);
          const long long oi = __ldcg(step_i + k);
          if (argmin_better(ov, oi, v, i)) v = ov, i = oi;
        }
        warp_argmin(v, i);
        if (lane == 0) next = static_cast<int>(i);
      }
    }
    __syncthreads();
  }
  if constexpr (kSync == GreedySync::cluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cooperative_groups::this_cluster().sync();  // no block leaves while another reads its slots
#endif
  }
}

template <typename T, GreedySync kSync>
cudaError_t launch(const GreedyPlan& plan, long long images, GreedyArgs args, cudaStream_t stream) {
  auto kernel = greedy_kernel<T, kSync>;
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(images * plan.blocks_per_image));
  config.blockDim = dim3(static_cast<unsigned>(plan.threads));
  config.dynamicSmemBytes = plan.shared_bytes;
  config.stream = stream;
  if constexpr (kSync == GreedySync::cluster) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(plan.blocks_per_image);
    attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
    config.attrs = attr, config.numAttrs = 1;
  } else if constexpr (kSync == GreedySync::barrier) {
    attr[0].id = cudaLaunchAttributeCooperative;  // every block resident, or the launch fails
    attr[0].val.cooperative = 1;
    config.attrs = attr, config.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&config, kernel, args);
}

// Opt-ins a launch of `kernel` with the plan's shared memory (and cluster size) needs.
template <typename Kernel>
cudaError_t allow(Kernel kernel, size_t shared_bytes, long long cluster) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(shared_bytes));
  if (err == cudaSuccess && cluster > 8)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  return err;
}

}  // namespace

// Blocks per image P: enough to give every SM a block (one wave), but no block with less than
// kMinBlockWork multiply-adds per step, and at least enough that a block's running state fits in
// shared memory. Then the cache: as many channels of the block's pixels as shared memory holds,
// the next kRegChannels of each thread's first pixel in registers. Then the agreement: P = 1
// needs none; else a cluster when the GPU runs sm_90 code and holds every image's cluster at
// once; else the global barrier with as many images per launch as stay resident together; else a
// cluster anyway (images then take turns: slower, still correct).
cudaError_t greedy_proxy_sampling_plan(DType dtype, long long B, long long HW, long long C,
                                       GreedyPlan* plan) {
  *plan = GreedyPlan{};
  int device = 0, sms = 0, optin = 0, major = 0, cooperative = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  if (cudaPeekAtLastError() != cudaSuccess) return cudaGetLastError();
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    GreedyPlan& l = *plan;
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, greedy_kernel<T, GreedySync::cluster>) != cudaSuccess) return;
    const long long budget =
        static_cast<long long>(optin) - static_cast<long long>(attr.sharedSizeBytes);
    const long long q_bytes = round_up(C, 8) * static_cast<long long>(sizeof(A));
    const long long state_bytes = 2 * sizeof(A) + 1;  // per pixel: cumulative, score, chosen
    const long long most_pixels = (budget - q_bytes - 16) / state_bytes / 8 * 8;
    if (most_pixels < 8) {
      l.unsupported = "too many channels for the CUDA kernel's shared memory";
      return;
    }
    long long P = std::clamp<long long>(sms / B, 1, (HW * C + kMinBlockWork - 1) / kMinBlockWork);
    P = std::max(P, (HW + most_pixels - 1) / most_pixels);
    P = std::min(P, HW);
    l.blocks_per_image = P;
    l.stride = static_cast<int>(round_up((HW + P - 1) / P, 8));
    l.threads = static_cast<int>(std::min<long long>(kMaxThreads, round_up(l.stride, 32)));
    const long long fixed = q_bytes + l.stride * state_bytes + 16;  // 16: the cache's alignment
    long long cached = (budget - fixed) / (l.stride * static_cast<long long>(sizeof(T)));
    cached = cached >= C ? C : cached / 8 * 8;
    l.cached = static_cast<int>(cached);
    l.in_registers = static_cast<int>(std::min<long long>(C - cached, kRegChannels<A>));
    l.shared_bytes =
        static_cast<size_t>(fixed + cached * l.stride * static_cast<long long>(sizeof(T)));
    l.images_per_launch = B;
    l.sync = GreedySync::none;
    if (P == 1) return;

    // A cluster when the kernel was compiled for sm_90 (PTX 9.0+: its cluster code is in) and
    // the GPU can hold every image's cluster at once. A refused opt-in or query (an error a later
    // cudaGetLastError would report) only rules the option out.
    int clusters = 0;
    if (major >= 9 && attr.ptxVersion >= 90 && P <= kMaxCluster &&
        allow(greedy_kernel<T, GreedySync::cluster>, l.shared_bytes, P) == cudaSuccess) {
      cudaLaunchAttribute cluster{};
      cluster.id = cudaLaunchAttributeClusterDimension;
      cluster.val.clusterDim.x = static_cast<unsigned>(P);
      cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
      cudaLaunchConfig_t config = {};
      config.gridDim = dim3(static_cast<unsigned>(P));
      config.blockDim = dim3(static_cast<unsigned>(l.threads));
      config.dynamicSmemBytes = l.shared_bytes;
      config.attrs = &cluster, config.numAttrs = 1;
      if (cudaOccupancyMaxActiveClusters(&clusters, greedy_kernel<T, GreedySync::cluster>,
                                         &config) != cudaSuccess)
        clusters = 0;
    }
    cudaGetLastError();
    if (clusters >= B) {
      l.sync = GreedySync::cluster;
      return;
    }
    int per_sm = 0;
    if (cooperative &&
        allow(greedy_kernel<T, GreedySync::barrier>, l.shared_bytes, 1) == cudaSuccess &&
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm,
                                                      greedy_kernel<T, GreedySync::barrier>,
                                                      l.threads, l.shared_bytes) == cudaSuccess &&
        static_cast<long long>(per_sm) * sms >= P) {
      l.sync = GreedySync::barrier;
      l.images_per_launch = std::min<long long>(B, static_cast<long long>(per_sm) * sms / P);
      const long long slots = 2 * l.images_per_launch * P;
      l.workspace_bytes =
          static_cast<size_t>(B * sizeof(unsigned long long) + slots * (sizeof(A) + sizeof(int)));
      return;
    }
    cudaGetLastError();
    if (clusters >= 1) {
      l.sync = GreedySync::cluster;
      return;
    }
    l.unsupported =
        "too many pixels for the CUDA kernel on this GPU (an image's blocks must run at once)";
  });
}

cudaError_t greedy_proxy_sampling(DType dtype, const GreedyPlan& plan, long long B, long long HW,
                                  long long C, long long M, const void* feat,
                                  const long long* first, double scale, void* workspace,
                                  long long* out, cudaStream_t stream) {
  if (B == 0 || M == 0) return cudaSuccess;
  if (plan.unsupported != nullptr || HW > INT_MAX || C > INT_MAX ||
      B * plan.blocks_per_image > INT_MAX)
    return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    GreedyArgs args{};
    args.HW = static_cast<int>(HW), args.C = static_cast<int>(C), args.M = static_cast<int>(M);
    args.P = static_cast<int>(plan.blocks_per_image);
    args.cached = plan.cached, args.in_registers = plan.in_registers, args.stride = plan.stride;
    args.scale = scale;
    // workspace (barrier): arrivals (B), then the slots' values and indices
    unsigned char* ws = static_cast<unsigned char*>(workspace);
    const size_t slots = 2 * static_cast<size_t>(plan.images_per_launch * plan.blocks_per_image);
    args.arrivals = reinterpret_cast<unsigned long long*>(ws);
    args.slot_v = ws + B * sizeof(unsigned long long);
    args.slot_i = reinterpret_cast<int*>(ws + B * sizeof(unsigned long long) + slots * sizeof(A));
    cudaError_t err = cudaSuccess;
    switch (plan.sync) {
      case GreedySync::none:
        err = allow(greedy_kernel<T, GreedySync::none>, plan.shared_bytes, 1);
        break;
      case GreedySync::cluster:
        err =
            allow(greedy_kernel<T, GreedySync::cluster>, plan.shared_bytes, plan.blocks_per_image);
        break;
      case GreedySync::barrier:
        err = allow(greedy_kernel<T, GreedySync::barrier>, plan.shared_bytes, 1);
        break;
    }
    // Images in launches of images_per_launch (the barrier's residency; else all at once).
    for (long long b0 = 0; err == cudaSuccess && b0 < B; b0 += plan.images_per_launch) {
      const long long images = std::min(plan.images_per_launch, B - b0);
      GreedyArgs group = args;
      group.feat = static_cast<const T*>(feat) + static_cast<size_t>(b0) * C * HW;
      group.first = first + b0;
      group.out = out + b0 * M;
      group.arrivals = args.arrivals + b0;
      switch (plan.sync) {
        case GreedySync::none:
          err = launch<T, GreedySync::none>(plan, images, group, stream);
          break;
        case GreedySync::cluster:
          err = launch<T, GreedySync::cluster>(plan, images, group, stream);
          break;
        case GreedySync::barrier:
          err = launch<T, GreedySync::barrier>(plan, images, group, stream);
          break;
      }
    }
  });
}

}  // namespace busseg::cuda
