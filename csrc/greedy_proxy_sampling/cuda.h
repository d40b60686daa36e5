// busseg::greedy_proxy_sampling: CUDA launchers on raw pointers.
// feat (B, HW, C) channels-last, first (B,), out (B, M) int64, on blocks_per_image blocks per
// image (1: one block each; >= 2: cooperating blocks in a cooperative launch, which fails unless
// all B * blocks_per_image blocks fit on the GPU at once).
// greedy_proxy_sampling_blocks_per_image picks it; the workspace holds
// greedy_proxy_sampling_workspace_bytes.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "common/cuda_types.h"

namespace busseg::cuda {

cudaError_t greedy_proxy_sampling_blocks_per_image(DType dtype, long long B, long long HW,
                                                   long long C, long long* blocks_per_image);

size_t greedy_proxy_sampling_workspace_bytes(DType dtype, long long B, long long HW,
                                             long long blocks_per_image);

cudaError_t greedy_proxy_sampling(DType dtype, long long B, long long HW, long long C, long long M,
                                  long long blocks_per_image, const void* feat,
                                  const long long* first, double scale, void* workspace,
                                  long long* out, cudaStream_t stream);

}  // namespace busseg::cuda
