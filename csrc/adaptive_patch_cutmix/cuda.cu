// busseg::cutmix_patch_mask and busseg::adaptive_patch_cutmix (PH-Net Eq. 5-7; docs/ops.md), CUDA
// kernels: a block per image sorts its patches for the mask (mask.h defines the orders, for the
// CPU kernel alike), and one launch gathers every row of every tensor in the widest chunks that
// divide it (docs/kernels.md).
#include <algorithm>
#include <climits>
#include <cstdint>

#include "adaptive_patch_cutmix/cuda.h"
#include "adaptive_patch_cutmix/mask.h"
#include "common/cuda.cuh"

namespace busseg::cuda {
namespace {

// ---- the mask -------------------------------------------------------------------------------

constexpr int kMaskThreads = 1024;

__device__ __forceinline__ bool before(uint64_t ka, int ia, uint64_t kb, int ib) {
  return ka < kb || (ka == kb && ia < ib);
}

// Sorts the pairs (key[i], idx[i]), i < n (a power of two), ascending by key, then index. Every
// thread of the block calls it; it ends with a barrier.
__device__ void bitonic_sort(uint64_t* key, int* idx, int n) {
  for (int size = 2; size <= n; size <<= 1)
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
        const int i = 2 * t - (t & (stride - 1)), j = i + stride;  // i's bit `stride` is 0
        const uint64_t ki = key[i], kj = key[j];
        const int ii = idx[i], ij = idx[j];
        if (before(kj, ij, ki, ii) == ((i & size) == 0)) {  // out of this run's direction
          key[i] = kj, key[j] = ki;
          idx[i] = ij, idx[j] = ii;
        }
      }
      __syncthreads();
    }
}

template <typename T>
__global__ void __launch_bounds__(kMaskThreads)
    patch_mask_kernel(const T* __restrict__ hardness, const float* __restrict__ uniforms, int N,
                      int padded, int k, double low, double high, uint64_t* scratch_key,
                      int* scratch_idx, bool* __restrict__ mask) {
  __shared__ uint64_t shared_key[kMaskSharedPatches];
  __shared__ int shared_idx[kMaskSharedPatches];
  const long long b = blockIdx.x;
  const bool shared = padded <= kMaskSharedPatches;
  uint64_t* key = shared ? shared_key : scratch_key + b * padded;
  int* idx = shared ? shared_idx : scratch_idx + b * padded;
  hardness += b * N;
  uniforms += b * (N + 1);
  mask += b * N;
  // padding sorts last: its key is above every real one, its index above every patch's
  for (int i = threadIdx.x; i < padded; i += blockDim.x) {
    key[i] = i < N ? cutmix::shield_key(static_cast<double>(load(hardness + i))) : ~uint64_t(0);
    idx[i] = i;
  }
  __syncthreads();
  bitonic_sort(key, idx, padded);
  for (int p = threadIdx.x; p < N; p += blockDim.x) mask[idx[p]] = p < k;  // shielded, for now
  __syncthreads();
  for (int i = threadIdx.x; i < padded; i += blockDim.x) {
    key[i] = i < N ? cutmix::replace_key(mask[i], uniforms[1 + i]) : ~uint64_t(0);
    idx[i] = i;
  }
  __syncthreads();
  bitonic_sort(key, idx, padded);
  const long long n = cutmix::replaced_count(uniforms[0], low, high, N, k);
  for (int p = threadIdx.x; p < N; p += blockDim.x) mask[idx[p]] = p >= n;  // n <= N - k
}

long long padded_patches(long long N) {
  long long padded = 1;
  while (padded < N) padded *= 2;
  return padded;
}

// ---- the gather -----------------------------------------------------------------------------

constexpr int kGatherThreads = 256;

// n / d for n < 2^31 by a multiply and a shift (the magic number of PyTorch's IntDivider); the
// default divides by 1.
struct Divider {
  unsigned magic = 1, shift = 0;
  static Divider by(unsigned d) {  // d >= 1
    Divider r;
    while (r.shift < 32 && (1ull << r.shift) < d) ++r.shift;
    r.magic = static_cast<unsigned>(((1ull << 32) * ((1ull << r.shift) - d)) / d + 1);
    return r;
  }
  __device__ __forceinline__ unsigned operator()(unsigned n) const {
    return (__umulhi(n, magic) + n) >> shift;
  }
};

// A tensor as rows of W elements, copied in chunks of 1 << vector_log2 bytes.
struct GatherRows {
  const unsigned char* src;
  unsigned char* dst;
  long long rows;            // B * R * H
  long long rows_per_image;  // R * H
  long long row_bytes;
  int chunks;     // per row
  Divider patch;  // chunk -> patch column
  int vector_log2;
};
struct GatherBatch {
  GatherRows t[kCutmixBatch];
  int count;
};

// Copies one row: chunk c from the own row where the mask keeps its patch, else from the other
// image's row; four chunks per lane in flight.
template <typename U>
__device__ __forceinline__ void copy_row(const unsigned char* own_row,
                                         const unsigned char* other_row, unsigned char* out_row,
                                         int chunks, const Divider& patch, const bool* keep) {
  const U* own = reinterpret_cast<const U*>(own_row);
  const U* other = reinterpret_cast<const U*>(other_row);
  U* out = reinterpret_cast<U*>(out_row);
  for (int c0 = threadIdx.x & 31; c0 < chunks; c0 += 4 * 32) {
    U v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int c = c0 + 32 * u;
      if (c < chunks) v[u] = __ldg((keep[patch(c)] ? own : other) + c);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (c0 + 32 * u < chunks) out[c0 + 32 * u] = v[u];
  }
}

__global__ void __launch_bounds__(kGatherThreads)
    patch_gather_kernel(GatherBatch batch, long long total_rows, const bool* __restrict__ mask,
                        long long B, long long H, long long ph, long long Nh, long long Nw) {
  const long long warps = static_cast<long long>(gridDim.x) * (kGatherThreads / 32);
  int t = 0;
  long long before_t = 0;  // rows of the tensors before t
  for (long long g = (static_cast<long long>(blockIdx.x) * kGatherThreads + threadIdx.x) / 32;
       g < total_rows; g += warps) {
    while (g - before_t >= batch.t[t].rows) before_t += batch.t[t++].rows;  // g only grows
    const GatherRows& d = batch.t[t];
    const long long row = g - before_t, b = row / d.rows_per_image, y = row % H;
    const long long other = (b + 1 == B ? 0 : b + 1) - b;  // images to the one that fills in
    const unsigned char* own = d.src + row * d.row_bytes;
    const unsigned char* from = own + other * d.rows_per_image * d.row_bytes;
    unsigned char* out = d.dst + row * d.row_bytes;
    const bool* keep = mask + (b * Nh + y / ph) * Nw;
    switch (d.vector_log2) {
      case 4:
        copy_row<uint4>(own, from, out, d.chunks, d.patch, keep);
        break;
      case 3:
        copy_row<uint2>(own, from, out, d.chunks, d.patch, keep);
        break;
      case 2:
        copy_row<unsigned>(own, from, out, d.chunks, d.patch, keep);
        break;
      case 1:
        copy_row<unsigned short>(own, from, out, d.chunks, d.patch, keep);
        break;
      default:
        copy_row<unsigned char>(own, from, out, d.chunks, d.patch, keep);
        break;
    }
  }
}

}  // namespace

size_t cutmix_patch_mask_scratch_bytes(long long B, long long N) {
  const long long padded = padded_patches(N);
  if (padded <= kMaskSharedPatches) return 0;
  return static_cast<size_t>(B * padded) * (sizeof(uint64_t) + sizeof(int));
}

cudaError_t cutmix_patch_mask(DType dtype, long long B, long long N, const void* hardness,
                              const float* uniforms, long long shield_count, double low,
                              double high, void* scratch, bool* mask, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (B > INT_MAX || N > (1LL << 30)) return cudaErrorInvalidValue;
  const long long padded = padded_patches(N);
  const int threads = static_cast<int>(std::clamp<long long>(padded / 2, 32, kMaskThreads));
  uint64_t* scratch_key = static_cast<uint64_t*>(scratch);
  int* scratch_idx =
      scratch == nullptr ? nullptr : reinterpret_cast<int*>(scratch_key + B * padded);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    patch_mask_kernel<T><<<static_cast<unsigned>(B), threads, 0, stream>>>(
        static_cast<const T*>(hardness), uniforms, static_cast<int>(N), static_cast<int>(padded),
        static_cast<int>(shield_count), low, high, scratch_key, scratch_idx, mask);
  });
}

cudaError_t adaptive_patch_cutmix(const CutmixBatch& batch, const bool* mask, const PatchShape& s,
                                  cudaStream_t stream) {
  GatherBatch rows{};
  long long total_rows = 0;
  for (int i = 0; i < batch.count; ++i) {
    const CutmixTensor& t = batch.t[i];
    const long long row_bytes = s.W * t.elem_size, patch_bytes = s.pw * t.elem_size;
    if (t.numel == 0) continue;  // (H or W is 0 for every tensor: nothing to copy)
    int log2 = 4;
    const auto fits = [&](long long v) { return v % (1LL << log2) == 0; };
    while (log2 > 0 && !(fits(row_bytes) && fits(patch_bytes) &&
                         fits(static_cast<long long>(reinterpret_cast<uintptr_t>(t.src))) &&
                         fits(static_cast<long long>(reinterpret_cast<uintptr_t>(t.dst)))))
      --log2;
    GatherRows& r = rows.t[rows.count++];
    r.src = static_cast<const unsigned char*>(t.src);
    r.dst = static_cast<unsigned char*>(t.dst);
    r.rows = t.numel / s.W;
    r.rows_per_image = r.rows / s.B;
    r.row_bytes = row_bytes;
    r.chunks = static_cast<int>(row_bytes >> log2);  // W <= 2^30 elements, chunks >= elements
    r.patch = Divider::by(static_cast<unsigned>(patch_bytes >> log2));
    r.vector_log2 = log2;
    total_rows += r.rows;
  }
  if (total_rows == 0) return cudaSuccess;
  const long long warps_per_block = kGatherThreads / 32;
  const long long blocks =
      std::min<long long>((total_rows + warps_per_block - 1) / warps_per_block, 1LL << 20);
  patch_gather_kernel<<<static_cast<unsigned>(blocks), kGatherThreads, 0, stream>>>(
      rows, total_rows, mask, s.B, s.H, s.ph, s.H / s.ph, s.W / s.pw);
  return cudaGetLastError();
}
}  // namespace busseg::cuda
