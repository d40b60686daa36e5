// Device helpers shared by the CUDA kernels: float32 accumulation for every storage type, warp
// reductions, and the dtype switch the launchers use.
//
// Kernels declare __launch_bounds__(threads) with the block size they are launched with (the
// resource report, tools/gpu_compile_check.py, reads it from the binary for the occupancy).
// A minimum of resident blocks is added only where ptxas would otherwise spill: a minimum of 1
// everywhere let ptxas double the registers of the ARP kernels and halve their occupancy.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "common/cuda_types.h"

namespace busseg::cuda {

// Accumulation type: float for half/bfloat16/float, double for double.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

template <typename T>
__device__ __forceinline__ acc_t<T> load(const T* p) {
  return static_cast<acc_t<T>>(*p);
}
template <>
__device__ __forceinline__ float load<__half>(const __half* p) {
  return __half2float(*p);
}
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T>
__device__ __forceinline__ void store(T* p, acc_t<T> v) {
  *p = static_cast<T>(v);
}
template <>
__device__ __forceinline__ void store<__half>(__half* p, float v) {
  *p = __float2half(v);
}
template <>
__device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16(v);
}

// max that propagates NaN from either side, like torch.maximum.
template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {
  return (a != a || a >= b) ? a : b;
}
template <typename A>
__device__ __forceinline__ A positive_inf() {
  return A(INFINITY);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename A>
__device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Arg-min over (value, index) pairs, ties to the smaller index; index < 0 means "no candidate".
template <typename A>
__device__ __forceinline__ bool argmin_better(A v, long long i, A best_v, long long best_i) {
  return i >= 0 && (best_i < 0 || v < best_v || (v == best_v && i < best_i));
}
template <typename A>
__device__ __forceinline__ void warp_argmin(A& v, long long& i) {
  for (int o = 16; o > 0; o >>= 1) {
    const A ov = __shfl_xor_sync(0xffffffffu, v, o);
    const long long oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (argmin_better(ov, oi, v, i)) v = ov, i = oi;
  }
}
// Block-wide arg-min; every thread of a 1-D block (blockDim.x a multiple of 32) must call it.
// The result is valid in thread 0. Ends with a barrier, so it can be called again at once.
template <typename A>
__device__ __forceinline__ void block_argmin(A& v, long long& i) {
  __shared__ A warp_v[32];
  __shared__ long long warp_i[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_argmin(v, i);
  if (lane == 0) warp_v[warp] = v, warp_i[warp] = i;
  __syncthreads();
  if (warp == 0) {
    const bool has = lane < static_cast<int>(blockDim.x >> 5);
    v = has ? warp_v[lane] : A(0);
    i = has ? warp_i[lane] : -1;
    warp_argmin(v, i);
  }
  __syncthreads();
}

// Asynchronous copies from global to shared memory: cp.async on sm_80 and later, a plain load and
// store before. `smem` is a shared-space address (shared_address); Bytes is 4, 8 or 16 (both
// addresses aligned to it); 2 is always a plain copy, as cp.async has no 2-byte form.
// async_commit() closes the group of copies issued since the last one; async_wait<N>() returns
// once at most N of this thread's groups are still in flight (a __syncthreads() after it makes
// every thread's finished copies visible to the block).
__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
template <int Bytes>
struct CopyWord;
template <>
struct CopyWord<2> {
  using type = unsigned short;
};
template <>
struct CopyWord<4> {
  using type = unsigned int;
};
template <>
struct CopyWord<8> {
  using type = uint2;
};
template <>
struct CopyWord<16> {
  using type = uint4;
};

template <int Bytes>
__device__ __forceinline__ void copy_async(unsigned smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem) : "memory");
    return;
  } else if constexpr (Bytes >= 4) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem), "l"(gmem), "n"(Bytes)
                 : "memory");
    return;
  }
#endif
  using W = typename CopyWord<Bytes>::type;
  *static_cast<W*>(__cvta_shared_to_generic(smem)) = *static_cast<const W*>(gmem);
}
// A 16-byte copy_async issued only where `pred` holds, without a branch.
__device__ __forceinline__ void copy_async_16_if(bool pred, unsigned smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %0, 0;\n"
      " @p cp.async.cg.shared.global [%1], [%2], 16;\n}\n" ::"r"(static_cast<int>(pred)),
      "r"(smem), "l"(gmem)
      : "memory");
#else
  if (pred) copy_async<16>(smem, gmem);
#endif
}
// An element at shared-space address `smem`, widened to the accumulator type (a plain shared
// load: with the address in 32 bits, offsets fold into the instruction).
template <typename T>
__device__ __forceinline__ acc_t<T> load_shared(unsigned smem);
template <>
__device__ __forceinline__ float load_shared<float>(unsigned smem) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(smem));
  return v;
}
template <>
__device__ __forceinline__ float load_shared<__half>(unsigned smem) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(smem));
  return __half2float(__ushort_as_half(v));
}
template <>
__device__ __forceinline__ float load_shared<__nv_bfloat16>(unsigned smem) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(smem));
  return __bfloat162float(__ushort_as_bfloat16(v));
}
__device__ __forceinline__ void async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Calls f(T{}) with T the storage type of `dtype`.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f16:
      f(__half{});
      break;
    case DType::bf16:
      f(__nv_bfloat16{});
      break;
    case DType::f32:
      f(float{});
      break;
    case DType::f64:
      f(double{});
      break;
  }
  return cudaGetLastError();
}

inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace busseg::cuda
