// busseg::adaptive_patch_cutmix (PH-Net Eq. 6-7; docs/ops.md), the CUDA gather: one launch
// gathers every element of up to kCutmixBatch tensors (any dtype, copied by element size).
#include <algorithm>
#include <cstdint>

#include "adaptive_patch_cutmix/cuda.h"
#include "common/cuda.cuh"

namespace busseg::cuda {
namespace {

constexpr int kThreads = 256;

template <typename U>
__device__ __forceinline__ void copy_element(const CutmixTensor& t, long long to, long long from) {
  static_cast<U*>(t.dst)[to] = static_cast<const U*>(t.src)[from];
}

__global__ void __launch_bounds__(kThreads)
    patch_cutmix_kernel(CutmixBatch batch, const bool* __restrict__ mask, PatchShape s,
                        long long total) {
  const long long HW = s.H * s.W, Nh = s.H / s.ph, Nw = s.W / s.pw;
  for (long long g = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; g < total;
       g += static_cast<long long>(gridDim.x) * blockDim.x) {
    int t = 0;
    long long e = g;
    while (e >= batch.t[t].numel) e -= batch.t[t++].numel;
    const CutmixTensor& ten = batch.t[t];
    const long long per_image = ten.numel / s.B;
    const long long b = e / per_image, pix = e % HW, y = pix / s.W, x = pix % s.W;
    const bool keep = mask[(b * Nh + y / s.ph) * Nw + x / s.pw];
    const long long from = keep ? e : e + (((b + 1) % s.B) - b) * per_image;
    switch (ten.elem_size) {
      case 1:
        copy_element<uint8_t>(ten, e, from);
        break;
      case 2:
        copy_element<uint16_t>(ten, e, from);
        break;
      case 4:
        copy_element<uint32_t>(ten, e, from);
        break;
      default:
        copy_element<uint64_t>(ten, e, from);
        break;
    }
  }
}

int grid_for(long long n) {
  return static_cast<int>(std::min<long long>((n + kThreads - 1) / kThreads, 65535LL * 8));
}

}  // namespace

cudaError_t adaptive_patch_cutmix(const CutmixBatch& batch, const bool* mask, const PatchShape& s,
                                  cudaStream_t stream) {
  long long total = 0;
  for (int t = 0; t < batch.count; ++t) total += batch.t[t].numel;
  if (total == 0) return cudaSuccess;
  patch_cutmix_kernel<<<grid_for(total), kThreads, 0, stream>>>(batch, mask, s, total);
  return cudaGetLastError();
}
}  // namespace busseg::cuda
