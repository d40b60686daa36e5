// busseg::memory_contrastive_loss (PH-Net Eq. 15; docs/ops.md), C++/OpenMP CPU. float32 on AVX-512
// CPUs: the fused tiles below (similarities, online log-sum-exp or softmax weights, and the
// gradient products on one tile while it is in cache, with common/proxy_gemm.h's micro-kernels).
// float64 and other CPUs: the shared tiled driver (common/contrastive_driver.h) with at::mm tiles
// and the OpenMP tile kernels below. Half and bfloat16 inputs are computed in float32 and the
// outputs cast back (as on CUDA).
#include "common/cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/contrastive_driver.h"
#include "common/proxy_gemm.h"
#include "memory_contrastive_loss/checks.h"

namespace busseg {
namespace {

// Contrastive tile kernels: rows of a (rows, cols) tile of dot products, a thread per block of
// rows.
template <typename scalar_t>
void lse_update_kernel(const at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                       at::Tensor& m, at::Tensor& s, double inv_tau) {
  const int64_t rows = sim.size(0), cols = sim.size(1);
  const scalar_t* S = sim.data_ptr<scalar_t>();
  const int64_t* la = ya.data_ptr<int64_t>();
  const int64_t* ln = yn.data_ptr<int64_t>();
  scalar_t* mp = m.data_ptr<scalar_t>();
  scalar_t* sp = s.data_ptr<scalar_t>();
  const scalar_t it = scalar_t(inv_tau), ninf = -std::numeric_limits<scalar_t>::infinity();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* Si = S + i * cols;
      const int64_t c = la[i];
      scalar_t mx = ninf;
      bool nan = false;
#pragma omp simd reduction(max : mx) reduction(| : nan)
      for (int64_t j = 0; j < cols; ++j) {
        const scalar_t v = ln[j] != c ? Si[j] * it : ninf;
        mx = std::max(mx, v);
        nan |= v != v;
      }
      const scalar_t m_new = nan ? std::numeric_limits<scalar_t>::quiet_NaN() : std::max(mp[i], mx);
      scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < cols; ++j)
        sum += ln[j] != c ? std::exp(Si[j] * it - m_new) : scalar_t(0);
      sp[i] = sp[i] * std::exp(mp[i] - m_new) + sum;
      mp[i] = m_new;
    }
  });
}

template <typename scalar_t>
void grad_tile_kernel(at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                      const at::Tensor& lse, const at::Tensor& coef, double inv_tau) {
  const int64_t rows = sim.size(0), cols = sim.size(1);
  scalar_t* S = sim.data_ptr<scalar_t>();
  const int64_t* la = ya.data_ptr<int64_t>();
  const int64_t* ln = yn.data_ptr<int64_t>();
  const scalar_t* l = lse.data_ptr<scalar_t>();
  const scalar_t* cf = coef.data_ptr<scalar_t>();
  const scalar_t it = scalar_t(inv_tau);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* Si = S + i * cols;
      const int64_t c = la[i];
      const scalar_t ci = cf[i], li = l[i];
      if (ci == 0) {  // an ignored anchor (or zero upstream gradient): nothing to spread
        std::fill(Si, Si + cols, scalar_t(0));
        continue;
      }
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j)
        Si[j] = ln[j] != c ? ci * std::exp(Si[j] * it - li) : scalar_t(0);
    }
  });
}

void lse_update_cpu(const at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                    at::Tensor& m, at::Tensor& s, double inv_tau) {
  AT_DISPATCH_FLOATING_TYPES(sim.scalar_type(), "lse_update_cpu",
                             [&] { lse_update_kernel<scalar_t>(sim, ya, yn, m, s, inv_tau); });
}

void grad_tile_cpu(at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                   const at::Tensor& lse, const at::Tensor& coef, double inv_tau) {
  AT_DISPATCH_FLOATING_TYPES(sim.scalar_type(), "grad_tile_cpu",
                             [&] { grad_tile_kernel<scalar_t>(sim, ya, yn, lse, coef, inv_tau); });
}

constexpr ContrastiveTiles kCpuTiles{&lse_update_cpu, &grad_tile_cpu, 1024};

#if BUSSEG_HAVE_PROXY_GEMM
// ---- float32 on AVX-512: fused tiles ---------------------------------------------------------
// Within a class block every (anchor, negative) pair counts, so a tile needs no mask. A thread
// owns a run of anchor tiles: it forms each (kRows × kCols) tile of similarities with the
// micro-kernels of proxy_gemm.h (anchors broadcast, 64 negatives per step, 6 × 4 zmm of
// accumulators), and while the tile is in L2 folds it into the anchors' online log-sum-exp
// (forward) or turns it into softmax weights and multiplies them into the anchor gradient and,
// when asked, a per-thread negative gradient (backward), with no atomics. Operands are packed
// once per class block: negatives transposed in tiles of kCols for the similarities, and for
// backward row-major copies with padded rows (the micro-kernels read whole zmm). Row strides are
// 16 floats off a power of two so that the rows of a panel do not share the few cache sets that
// a 1 KiB stride maps to.
namespace fused {

using proxy_gemm::kLanes;
using proxy_gemm::kTile;
using proxy_gemm::kVecs;
constexpr int64_t kRows = 96;                // anchors per tile (16 micro-tiles)
constexpr int64_t kCols = 256;               // negatives per tile
constexpr int64_t kStride = kCols + kLanes;  // row stride of the similarity tile and packed panels
constexpr int64_t kAnchorStride = kRows + kLanes;  // of the tile's transposed anchors
constexpr int64_t kChunk = 64;             // features per pass (the panel of negatives in L1)
constexpr int64_t kStep = kVecs * kLanes;  // negatives or features per micro-kernel step

inline int64_t row_stride(int64_t D) { return proxy_gemm::padded(D) + kLanes; }

// exp(x) as fast_math.h's exp_poly (Cephes, about 1 ulp), 16 lanes; scalef scales by 2ⁿ and
// gives 0 below the range. NaN propagates (vmaxps returns its second operand on NaN). The
// zero-masked forms with every lane set are the plain instructions; GCC 12's unmasked intrinsics
// pass an undefined source that -Wall reports as uninitialised.
constexpr __mmask16 kAll = 0xFFFF;
BUSSEG_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_maskz_max_ps(kAll, _mm512_set1_ps(-104.0f), x);
  x = _mm512_maskz_min_ps(kAll, _mm512_set1_ps(88.3762626f), x);
  const __m512 n =
      _mm512_maskz_roundscale_ps(kAll, _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(kAll, y, n);
}

// Horizontal max and sum of 16 lanes. A NaN similarity need not survive the max: exp carries it
// into the sum.
BUSSEG_AVX512 inline float lane_max(__m512 v) {
  alignas(64) float l[kLanes];
  _mm512_store_ps(l, v);
  float m = l[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, l[i]);
  return m;
}
BUSSEG_AVX512 inline float lane_sum(__m512 v) {
  alignas(64) float l[kLanes];
  _mm512_store_ps(l, v);
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += l[i];
  return s;
}

inline __mmask16 lanes_below(int64_t n) {
  return n >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// A float (rows, D) matrix copied into rows of row_stride(D) floats, zero-padded.
inline at::Tensor padded_rows(const at::Tensor& x) {
  const int64_t D = x.size(1);
  at::Tensor out = at::zeros({x.size(0), row_stride(D)}, x.options());
  out.narrow(1, 0, D).copy_(x);
  return out;
}

// Negatives (M, D) packed for the similarity kernel: tile t holds negatives [t kCols, +kCols)
// transposed, (D, kStride), zero-padded.
inline at::Tensor pack_negatives(const at::Tensor& n) {
  const int64_t M = n.size(0), D = n.size(1), tiles = (M + kCols - 1) / kCols;
  at::Tensor out = at::zeros({tiles, D, kStride}, n.options());
  const float* src = n.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * kCols, cols = std::min(kCols, M - j0);
      for (int64_t j = 0; j < cols; ++j)
        for (int64_t d = 0; d < D; ++d) dst[(t * D + d) * kStride + j] = src[(j0 + j) * D + d];
    }
  });
  return out;
}

// One class block packed: negatives transposed in tiles; where weights multiply them (the
// anchors' gradient or weighted_negatives) also row-major copies with padded rows, and the
// anchors' likewise for the negative gradient.
struct Block {
  int64_t N, M, D, ld;  // ld: row stride of the padded copies
  at::Tensor a, nt;     // anchors (N, D) as they are; negatives packed
  at::Tensor n_rows, a_rows;
  Block(const at::Tensor& a_, const at::Tensor& n_, bool weights_times_negatives,
        bool weights_times_anchors)
      : N(a_.size(0)),
        M(n_.size(0)),
        D(a_.size(1)),
        ld(row_stride(D)),
        a(a_),
        nt(pack_negatives(n_)) {
    if (weights_times_negatives) n_rows = padded_rows(n_);
    if (weights_times_anchors) a_rows = padded_rows(a_);
  }
  int64_t row_tiles() const { return (N + kRows - 1) / kRows; }
};

// Per-thread buffers: the tile's anchors transposed (D, kAnchorStride) and its similarities.
struct Workspace {
  std::vector<float> at, sim;
  explicit Workspace(int64_t D) : at(D * kAnchorStride), sim(kRows * kStride) {}
};

// sim[r, j] = <a_{i0+r}, n_{j0+j}> for the tile's rows and cols (ws.at holds its anchors).
inline void similarities(const Block& b, Workspace& ws, int64_t rows, int64_t j0, int64_t cols) {
  proxy_gemm::logits(ws.at.data(), kAnchorStride, rows, b.D,
                     b.nt.data_ptr<float>() + (j0 / kCols) * b.D * kStride, kStride, cols,
                     ws.sim.data(), kStride, kChunk);
}

inline void load_anchors(const Block& b, Workspace& ws, int64_t i0, int64_t rows) {
  const float* a = b.a.data_ptr<float>() + i0 * b.D;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < b.D; ++d) ws.at[d * kAnchorStride + r] = a[r * b.D + d];
}

// Folds exp(sim/τ) of each row into its running max m and scaled sum s. With `weighted` (rows of
// stride ld, D features used) it also leaves exp(sim/τ − m_new) in sim, for the caller to multiply
// into those rows, and rescales them to the new max.
BUSSEG_AVX512 void fold_rows(float* sim, int64_t rows, int64_t cols, float inv_tau, float* m,
                             float* s, float* weighted = nullptr, int64_t ld = 0, int64_t D = 0) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = sim + r * kStride;
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < cols; j += kLanes)
      mx = _mm512_maskz_max_ps(kAll, mx, _mm512_mask_loadu_ps(mx, lanes_below(cols - j), row + j));
    const float m_new = std::max(m[r], lane_max(mx) * inv_tau);
    const __m512 scale = _mm512_set1_ps(inv_tau), shift = _mm512_set1_ps(-m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j += kLanes) {
      const __mmask16 k = lanes_below(cols - j);
      const __m512 e = exp16(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, row + j), scale, shift));
      sum = _mm512_mask_add_ps(sum, k, sum, e);
      if (weighted) _mm512_mask_storeu_ps(row + j, k, e);
    }
    const float rescale = std::exp(m[r] - m_new);
    s[r] = s[r] * rescale + lane_sum(sum);
    m[r] = m_new;
    if (weighted && rescale != 1.0f) {
      float* w = weighted + r * ld;
      for (int64_t d = 0; d < D; ++d) w[d] *= rescale;
    }
  }
}

// In place: sim[r, j] ← coef_r · exp(sim[r, j]/τ − lse_r), the softmax weight times dloss/dlse.
BUSSEG_AVX512 void softmax_weights(float* sim, int64_t rows, int64_t cols, float inv_tau,
                                   const float* lse, const float* coef) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = sim + r * kStride;
    const __m512 scale = _mm512_set1_ps(inv_tau), shift = _mm512_set1_ps(-lse[r]),
                 c = _mm512_set1_ps(coef[r]);
    for (int64_t j = 0; j < cols; j += kLanes) {
      const __mmask16 k = lanes_below(cols - j);
      const __m512 e = exp16(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, row + j), scale, shift));
      _mm512_mask_storeu_ps(row + j, k,
                            coef[r] == 0.0f ? _mm512_setzero_ps() : _mm512_mul_ps(c, e));
    }
  }
}

// da[r, :] += Σ_j w[r, j] n_{j0+j} for the tile's rows: 64 negatives × 64 features of n stay in L1
// while every micro-tile of 6 anchors passes over them.
inline void anchor_grads(const Block& b, const float* w, int64_t rows, int64_t j0, int64_t cols,
                         float* da) {
  const float* n = b.n_rows.data_ptr<float>() + j0 * b.ld;
  for (int64_t i0 = 0; i0 < cols; i0 += kStep) {
    const int64_t ni = std::min(kStep, cols - i0);
    for (int64_t m0 = 0; m0 < b.D; m0 += kStep) {
      const proxy_gemm::ProxyChunk chunk = proxy_gemm::proxy_chunk(b.D, m0);
      for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
        const int r = static_cast<int>(std::min<int64_t>(kTile, rows - r0));
        proxy_gemm::kGradTiles[(r - 1) * kVecs + chunk.vecs - 1](
            w + r0 * kStride + i0, kStride, ni, n + i0 * b.ld + m0, b.ld, da + r0 * b.ld + m0, b.ld,
            chunk.tail);
      }
    }
  }
}

// dn[j0 + j, :] += Σ_r w[r, j] a_{i0+r} for the tile's columns.
inline void negative_grads(const Block& b, const float* w, int64_t i0, int64_t rows, int64_t j0,
                           int64_t cols, float* dn) {
  const float* a = b.a_rows.data_ptr<float>() + i0 * b.ld;
  for (int64_t m0 = 0; m0 < b.D; m0 += kStep) {
    const proxy_gemm::ProxyChunk chunk = proxy_gemm::proxy_chunk(b.D, m0);
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int r = static_cast<int>(std::min<int64_t>(kTile, cols - c0));
      proxy_gemm::kLogitsTiles[(r - 1) * kVecs + chunk.vecs - 1](
          w + c0, kStride, rows, a + m0, b.ld, dn + (j0 + c0) * b.ld + m0, b.ld, chunk.tail, true);
    }
  }
}

// Calls tile(ws, i0, rows) for this thread's run of anchor tiles.
template <typename F>
void for_anchor_tiles(const Block& b, const F& tile) {
  parallel_chunks(b.row_tiles(), [&](int64_t t0, int64_t t1) {
    Workspace ws(b.D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * kRows, rows = std::min(kRows, b.N - i0);
      load_anchors(b, ws, i0, rows);
      tile(ws, i0, rows);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& anchors, const at::Tensor& anchor_labels, const at::Tensor& negatives,
    const at::Tensor& negative_labels, const at::Tensor& positives, const at::Tensor& has_positive,
    double temperature, bool save_weighted_negatives) {
  using namespace contrastive;
  const Prepared p = prepare(anchors, anchor_labels, negatives, negative_labels, positives,
                             has_positive, temperature);
  const bool save = save_weighted_negatives;
  const int64_t D = anchors.size(1);
  const float inv_tau = static_cast<float>(1.0 / temperature);
  at::Tensor m = p.pos.clone(), s = at::ones_like(p.pos);  // the positive term starts the sum
  at::Tensor wn = save ? at::zeros_like(p.a) : at::empty({0}, p.a.options());
  for_classes(p, positives.size(0), [&](const ClassBlock& blk) {
    at::Tensor mc = m.index_select(0, blk.rows), sc = s.index_select(0, blk.rows);
    const Block b(blk.a, blk.n, save, false);
    // Σ_j e^{sim_ij/τ − m_i} n̂_j in padded rows, as the backward's anchor gradient
    at::Tensor wc = save ? at::zeros({b.N, b.ld}, b.a.options()) : at::Tensor();
    float* mp = mc.data_ptr<float>();
    float* sp = sc.data_ptr<float>();
    for_anchor_tiles(b, [&](Workspace& ws, int64_t i0, int64_t rows) {
      float* w = save ? wc.data_ptr<float>() + i0 * b.ld : nullptr;
      for (int64_t j0 = 0; j0 < b.M; j0 += kCols) {
        const int64_t cols = std::min(kCols, b.M - j0);
        similarities(b, ws, rows, j0, cols);
        fold_rows(ws.sim.data(), rows, cols, inv_tau, mp + i0, sp + i0, w, b.ld, D);
        if (save) anchor_grads(b, ws.sim.data(), rows, j0, cols, w);
      }
    });
    m.index_copy_(0, blk.rows, mc);
    s.index_copy_(0, blk.rows, sc);
    if (save) wn.index_copy_(0, blk.rows, wc.narrow(1, 0, D) / sc.unsqueeze(1));
  });
  auto [loss, lse] = loss_from_running_lse(p, m, s);
  return {loss, lse, wn};
}

std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_loss, const at::Tensor& anchors, const at::Tensor& anchor_labels,
    const at::Tensor& negatives, const at::Tensor& negative_labels, const at::Tensor& positives,
    const at::Tensor& has_positive, const at::Tensor& lse, const at::Tensor& weighted_negatives,
    double temperature, bool need_grad_negatives) {
  using namespace contrastive;
  const Prepared p = prepare(anchors, anchor_labels, negatives, negative_labels, positives,
                             has_positive, temperature);
  const int64_t K = positives.size(0), D = anchors.size(1);
  const float inv_tau = static_cast<float>(1.0 / temperature);
  auto [l, coef, da, dn, tiles_for_anchors] = backward_start(
      p, grad_loss, positives, lse, weighted_negatives, temperature, need_grad_negatives);
  const int threads = at::get_num_threads();
  // no pass over the tiles when forward saved the anchors' part and negatives need no gradient
  if (tiles_for_anchors || need_grad_negatives)
    for_classes(p, K, [&](const ClassBlock& blk) {
      const at::Tensor lc = l.index_select(0, blk.rows), cc = coef.index_select(0, blk.rows);
      const Block b(blk.a, blk.n, tiles_for_anchors, need_grad_negatives);
      at::Tensor dac = tiles_for_anchors ? at::zeros({b.N, b.ld}, b.a.options()) : at::Tensor();
      // one negative gradient per thread (threads share the negatives), summed afterwards
      at::Tensor dnc =
          need_grad_negatives ? at::zeros({threads, b.M, b.ld}, b.a.options()) : at::Tensor();
      const float* lp = lc.data_ptr<float>();
      const float* cp = cc.data_ptr<float>();
      for_anchor_tiles(b, [&](Workspace& ws, int64_t i0, int64_t rows) {
        float* dn_thread = need_grad_negatives
                               ? dnc.data_ptr<float>() + omp_get_thread_num() * b.M * b.ld
                               : nullptr;
        for (int64_t j0 = 0; j0 < b.M; j0 += kCols) {
          const int64_t cols = std::min(kCols, b.M - j0);
          similarities(b, ws, rows, j0, cols);
          softmax_weights(ws.sim.data(), rows, cols, inv_tau, lp + i0, cp + i0);
          if (tiles_for_anchors)
            anchor_grads(b, ws.sim.data(), rows, j0, cols, dac.data_ptr<float>() + i0 * b.ld);
          if (dn_thread) negative_grads(b, ws.sim.data(), i0, rows, j0, cols, dn_thread);
        }
      });
      if (tiles_for_anchors) da.index_add_(0, blk.rows, dac.narrow(1, 0, D));
      if (need_grad_negatives) dn.index_add_(0, blk.cols, dnc.sum(0).narrow(1, 0, D));
    });
  at::Tensor grad_anchors = normalize_backward(anchors, p.a, da);
  at::Tensor grad_negatives = need_grad_negatives ? normalize_backward(negatives, p.n, dn)
                                                  : at::empty({0}, anchors.options());
  return {grad_anchors, grad_negatives};
}

// The fused tiles apply to float32 on a CPU with AVX-512 (inputs already widened).
inline bool use(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat && proxy_gemm::supported();
}

}  // namespace fused

#endif  // BUSSEG_HAVE_PROXY_GEMM

// The fused tiles where they apply, the at::mm driver for everything else (inputs widened).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_widened(
    const at::Tensor& a, const at::Tensor& ya, const at::Tensor& n, const at::Tensor& yn,
    const at::Tensor& p, const at::Tensor& has_positive, double temperature, bool save) {
#if BUSSEG_HAVE_PROXY_GEMM
  if (fused::use(a)) return fused::forward(a, ya, n, yn, p, has_positive, temperature, save);
#endif
  return contrastive_forward(kCpuTiles, a, ya, n, yn, p, has_positive, temperature, save);
}

std::tuple<at::Tensor, at::Tensor> backward_widened(const at::Tensor& g, const at::Tensor& a,
                                                    const at::Tensor& ya, const at::Tensor& n,
                                                    const at::Tensor& yn, const at::Tensor& p,
                                                    const at::Tensor& has_positive,
                                                    const at::Tensor& l, const at::Tensor& wn,
                                                    double temperature, bool need_grad_negatives) {
#if BUSSEG_HAVE_PROXY_GEMM
  if (fused::use(a))
    return fused::backward(g, a, ya, n, yn, p, has_positive, l, wn, temperature,
                           need_grad_negatives);
#endif
  return contrastive_backward(kCpuTiles, g, a, ya, n, yn, p, has_positive, l, wn, temperature,
                              need_grad_negatives);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> memory_contrastive_loss_cpu(
    const at::Tensor& anchors, const at::Tensor& anchor_labels, const at::Tensor& negatives,
    const at::Tensor& negative_labels, const at::Tensor& positives, const at::Tensor& has_positive,
    double temperature, bool save_weighted_negatives) {
  check_memory_contrastive_loss_args(anchors, anchor_labels, negatives, negative_labels, positives,
                                     has_positive, temperature);
  auto [loss, lse, wn] =
      forward_widened(widened(anchors), anchor_labels, widened(negatives), negative_labels,
                      widened(positives), has_positive, temperature, save_weighted_negatives);
  const at::ScalarType dtype = anchors.scalar_type();
  return {loss.to(dtype), lse.to(dtype), wn.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor> memory_contrastive_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& anchors, const at::Tensor& anchor_labels,
    const at::Tensor& negatives, const at::Tensor& negative_labels, const at::Tensor& positives,
    const at::Tensor& has_positive, const at::Tensor& lse, const at::Tensor& weighted_negatives,
    double temperature, bool need_grad_negatives) {
  check_memory_contrastive_loss_backward_args(grad_loss, anchors, anchor_labels, negatives,
                                              negative_labels, positives, has_positive, lse,
                                              weighted_negatives, temperature);
  auto [ga, gn] =
      backward_widened(widened(grad_loss), widened(anchors), anchor_labels, widened(negatives),
                       negative_labels, widened(positives), has_positive, widened(lse),
                       widened(weighted_negatives), temperature, need_grad_negatives);
  return {ga.to(anchors.scalar_type()), gn.to(negatives.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CPU, m) {
  m.impl("memory_contrastive_loss", &memory_contrastive_loss_cpu);
  m.impl("memory_contrastive_loss_backward", &memory_contrastive_loss_backward_cpu);
}

}  // namespace busseg
