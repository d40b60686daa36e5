// busseg::greedy_proxy_sampling: the CUDA launcher on raw pointers.
// feat (B, C, H*W) as stored (NCHW, contiguous), first (B,) int64, out (B, M) int64.
// greedy_proxy_sampling_plan decides how the batch is laid out on the GPU (blocks per image, what
// stays on chip, how the blocks of an image agree on each proxy) and how many bytes of zeroed
// workspace the launch needs; greedy_proxy_sampling launches that plan.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "common/cuda_types.h"

namespace busseg::cuda {

// How the blocks of one image agree on each step's proxy: one block per image (none), a thread
// block cluster with distributed shared memory (sm_90), or a per-image barrier in global memory
// among co-resident blocks (a cooperative launch).
enum class GreedySync { none, cluster, barrier };

struct GreedyPlan {
  long long blocks_per_image;
  long long images_per_launch;  // the barrier needs every block of a launch resident at once
  int threads;                  // per block
  int stride;                   // pixels per row of the shared feature cache (>= a block's pixels)
  int cached;                   // channels [0, cached) of a block's pixels in shared memory
  int in_registers;             // the next channels of each thread's first pixel, in registers
  size_t shared_bytes;          // dynamic shared memory per block
  size_t workspace_bytes;       // zeroed global memory (the barrier's counters and slots)
  GreedySync sync;
  const char* unsupported;  // why the kernel cannot take this problem (nullptr: it can)
};

// The plan for B images of H*W = HW pixels and C channels on the current device.
cudaError_t greedy_proxy_sampling_plan(DType dtype, long long B, long long HW, long long C,
                                       GreedyPlan* plan);

cudaError_t greedy_proxy_sampling(DType dtype, const GreedyPlan& plan, long long B, long long HW,
                                  long long C, long long M, const void* feat,
                                  const long long* first, double scale, void* workspace,
                                  long long* out, cudaStream_t stream);

}  // namespace busseg::cuda
