// busseg::cutmix_patch_mask and busseg::adaptive_patch_cutmix: CUDA launchers on raw pointers.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "common/cuda_types.h"

namespace busseg::cuda {

// The mask: hardness (B, N) contiguous (N = Nh * Nw patches), uniforms (B, 1 + N) float32, mask
// (B, N) bool. Images of more than kMaskSharedPatches patches sort in global scratch of
// cutmix_patch_mask_scratch_bytes (none otherwise).
constexpr long long kMaskSharedPatches = 2048;
size_t cutmix_patch_mask_scratch_bytes(long long B, long long N);
cudaError_t cutmix_patch_mask(DType dtype, long long B, long long N, const void* hardness,
                              const float* uniforms, long long shield_count, double low,
                              double high, void* scratch, bool* mask, cudaStream_t stream);

// The gather: up to kCutmixBatch tensors per launch, each (B, R, H, W) contiguous with rows of W
// elements of elem_size bytes; patch_mask (B, Nh, Nw) bool.
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
