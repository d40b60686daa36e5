// busseg::adaptive_patch_cutmix: the CUDA launcher on raw pointers. The patch mask is
// (B, Nh, Nw) bool.
#pragma once
#include <cuda_runtime.h>

#include "common/cuda_types.h"

namespace busseg::cuda {

// Up to kCutmixBatch tensors per launch, each (B, R, H, W) contiguous with rows of W elements.
constexpr int kCutmixBatch = 8;
struct CutmixTensor {
  const void* src;
  void* dst;
  long long numel;  // B * R * H * W
  int elem_size;    // 1, 2, 4 or 8 bytes
};
struct CutmixBatch {
  CutmixTensor t[kCutmixBatch];
  int count;
};
cudaError_t adaptive_patch_cutmix(const CutmixBatch& batch, const bool* mask, const PatchShape& s,
                                  cudaStream_t stream);

}  // namespace busseg::cuda
