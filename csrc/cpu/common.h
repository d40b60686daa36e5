// Helpers shared by the CPU kernels: a vectorised dot product with a wider accumulator and the
// OpenMP split of a range into one contiguous chunk per thread.
#pragma once
#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace busseg {

template <typename acc_t, typename scalar_t>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) s += acc_t(a[c]) * acc_t(b[c]);
  return s;
}

// OpenMP over pixels in one contiguous chunk per thread (honouring torch.set_num_threads), so
// each thread allocates its scratch once: body(begin, end).
template <typename F>
inline void parallel_pixels(int64_t n, const F& body) {
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t threads = omp_get_num_threads(), chunk = (n + threads - 1) / threads;
    const int64_t begin = omp_get_thread_num() * chunk, end = std::min(n, begin + chunk);
    if (begin < end) body(begin, end);
  }
}

}  // namespace busseg
