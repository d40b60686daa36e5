// Blocks of kLanes consecutive values as GCC vector-extension values, for kernels that keep a
// handful of running sums in registers across a long loop (the compiler lowers each block to one
// AVX-512 register of floats, two of AVX2 or of doubles, ... in each SIMD clone). Loads widen
// float16 / bfloat16 to float as they read and stores round back to the nearest even, as c10's
// conversions do. Every helper is always inlined so it takes the ISA of the clone that calls it,
// and takes or returns vectors by reference (a vector passed by value would change the ABI
// between clones).
#pragma once
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace busseg {
namespace {

constexpr int kLanes = 16;

// Lanes<T>: kLanes values of type T (GCC takes no vector_size on a dependent type: one
// specialisation per element type).
template <typename T>
struct LanesOf;
#define BUSSEG_LANES_OF(T)                                           \
  template <>                                                        \
  struct LanesOf<T> {                                                \
    typedef T type __attribute__((vector_size(kLanes * sizeof(T)))); \
  };
BUSSEG_LANES_OF(float)
BUSSEG_LANES_OF(double)
BUSSEG_LANES_OF(_Float16)
BUSSEG_LANES_OF(uint16_t)
BUSSEG_LANES_OF(uint32_t)
BUSSEG_LANES_OF(int32_t)
BUSSEG_LANES_OF(int64_t)
#undef BUSSEG_LANES_OF
template <typename T>
using Lanes = typename LanesOf<T>::type;

// Lane masks for Lanes<T> (all bits set: on): signed integers of T's width, the type of a
// comparison of two Lanes<T>. Stored in memory as kLanes MaskLane<T> values (a std::vector of
// vector types is not aligned to the vector).
template <typename T>
using MaskLane = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
template <typename T>
using LaneMask = Lanes<MaskLane<T>>;

// v = the kLanes values at p, in the accumulator type acc_t.
template <typename acc_t, typename scalar_t>
[[gnu::always_inline]] inline void load_lanes(const scalar_t* p, Lanes<acc_t>& v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    Lanes<_Float16> h;
    std::memcpy(&h, p, sizeof h);
    v = __builtin_convertvector(h, Lanes<float>);
  } else {
    static_assert(std::is_same_v<scalar_t, c10::BFloat16>, "float, double, half or bfloat16");
    Lanes<uint16_t> h;
    std::memcpy(&h, p, sizeof h);
    const Lanes<uint32_t> bits = __builtin_convertvector(h, Lanes<uint32_t>) << 16;
    v = (Lanes<float>)bits;
  }
}

// The same for the lanes whose index + lane lies in [0, size); the other lanes are 0. For the rare
// block whose plain load would read past either end of an allocation.
template <typename acc_t, typename scalar_t>
[[gnu::always_inline]] inline void load_lanes_within(const scalar_t* base, int64_t index,
                                                     int64_t size, Lanes<acc_t>& v) {
  scalar_t inside[kLanes] = {};
  for (int l = 0; l < kLanes; ++l)
    if (index + l >= 0 && index + l < size) inside[l] = base[index + l];
  load_lanes<acc_t>(inside, v);
}

// Stores lanes [0, n) of v at p in scalar_t (half and bfloat16 rounded to nearest even). acc_t is
// not deduced: store_lanes<acc_t>(v, p, n).
template <typename acc_t, typename scalar_t>
[[gnu::always_inline]] inline void store_lanes(const Lanes<acc_t>& v, scalar_t* p, int n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (n == kLanes)
      std::memcpy(p, &v, sizeof v);
    else
      std::memcpy(p, &v, n * sizeof(acc_t));
  } else {
    Lanes<uint16_t> h;
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      const Lanes<_Float16> narrow = __builtin_convertvector(v, Lanes<_Float16>);
      h = (Lanes<uint16_t>)narrow;
    } else {  // c10::round_to_nearest_even, NaN as 0x7fc0
      const Lanes<uint32_t> bits = (Lanes<uint32_t>)v;
      const Lanes<uint32_t> rounded = (bits + (((bits >> 16) & 1u) + 0x7fffu)) >> 16;
      h = __builtin_convertvector(v != v ? Lanes<uint32_t>{} + 0x7fc0u : rounded, Lanes<uint16_t>);
    }
    std::memcpy(p, &h, n * sizeof(uint16_t));
  }
}

}  // namespace
}  // namespace busseg
