// Helpers shared by the CPU kernels: a NaN-propagating max, vectorised loops over contiguous runs
// (accumulating in a wider type than the inputs where asked), float copies of half inputs and the
// OpenMP split of a range into one contiguous chunk per thread.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

// Inner loops get AVX-512 and AVX2+FMA clones chosen at load time, so one binary runs everywhere
// (the AVX-512 clone halves the time of the exp/log-bound hardness loop on Zen 4/5).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BUSSEG_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BUSSEG_SIMD_CLONES
#endif

namespace busseg {
namespace {

// max that propagates NaN from either side, like torch.maximum.
template <typename T>
inline T nan_max(T a, T b) {
  return (a != a || a >= b) ? a : b;
}

// acc[i] += a[i] * b[i] in the accumulator's type, a and b possibly stored narrower
template <typename acc_t, typename a_t, typename b_t>
BUSSEG_SIMD_CLONES void multiply_add(acc_t* acc, const a_t* a, const b_t* b, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += acc_t(a[i]) * acc_t(b[i]);
}

// y[i] += alpha * x[i], x possibly stored narrower than the accumulator y
template <typename acc_t, typename scalar_t>
BUSSEG_SIMD_CLONES void axpy(acc_t alpha, const scalar_t* x, acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * acc_t(x[i]);
}

// y[i] += a0 * x0[i] + a1 * x1[i] + a2 * x2[i] + a3 * x3[i]: four axpys in one pass over y
template <typename acc_t, typename scalar_t>
BUSSEG_SIMD_CLONES void axpy4(const acc_t* a, const scalar_t* x0, const scalar_t* x1,
                              const scalar_t* x2, const scalar_t* x3, acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    y[i] += a[0] * acc_t(x0[i]) + a[1] * acc_t(x1[i]) + a[2] * acc_t(x2[i]) + a[3] * acc_t(x3[i]);
}

// Zeroes a row of n accumulators, lets fill(row) sum into it and stores it into dst: the row is
// dst itself when dst has the accumulator type, else `scratch` (n), converted on the store.
template <typename acc_t, typename scalar_t, typename F>
void accumulate_row(int64_t n, acc_t* scratch, scalar_t* dst, const F& fill) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::fill(dst, dst + n, acc_t(0));
    fill(dst);
  } else {
    std::fill(scratch, scratch + n, acc_t(0));
    fill(scratch);
    for (int64_t i = 0; i < n; ++i) dst[i] = scalar_t(scratch[i]);
  }
}

// A float32 copy of a half / bfloat16 tensor, for the ops whose drivers work through ATen ops and
// float kernels (one extra pass over the inputs; the float paths then run unchanged); any other
// tensor as it is.
inline at::Tensor widened(const at::Tensor& t) {
  const at::ScalarType s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 ? t.to(at::kFloat) : t;
}

inline std::vector<at::Tensor> widened(at::TensorList ts) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : ts) out.push_back(widened(t));
  return out;
}

// at::empty whose buffer asks Linux for transparent huge pages before it is first touched. A
// fresh buffer of more than 32 MiB comes from mmap on every call (glibc's threshold cannot go
// higher), and its 4 KiB pages then cost a fault each on the first write: for a 33 MiB feature
// gradient that took longer than the kernel that fills it. Only whole 2 MiB pages inside the
// buffer are advised; the advice is a hint (ignored where THP is off, harmless if it fails).
inline at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t data = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (data + kHuge - 1) & ~(kHuge - 1),
                  end = (data + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return t;
}

// OpenMP over [0, n) in one contiguous chunk per thread (honouring torch.set_num_threads), so
// each thread allocates its scratch once: body(begin, end). With one thread or one unit of work
// the body runs inline (as thread 0): an OpenMP region costs about 1 µs even with one thread,
// a fifth of a small op's whole call.
template <typename F>
inline void parallel_chunks(int64_t n, const F& body) {
  const int threads = at::get_num_threads();
  if (threads == 1 || n <= 1) {
    if (n > 0) body(0, n);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t threads = omp_get_num_threads(), chunk = (n + threads - 1) / threads;
    const int64_t begin = omp_get_thread_num() * chunk, end = std::min(n, begin + chunk);
    if (begin < end) body(begin, end);
  }
}

}  // namespace
}  // namespace busseg
