// Tensor binding of the busseg::memory_contrastive_loss CUDA launchers: the tiles of similarities
// are cuBLAS products of the unit rows in the inputs' dtype (at::mm: float32 in TF32 exactly when
// PyTorch's float32 matmuls may, half and bfloat16 on tensor cores with float32 output), each tile
// read once by the epilogue of cuda.cu, which writes the softmax weights (forward, when Σ π n̂ is
// saved) or the gradient tile (backward) once, in place or in the operand dtype, for the next
// product. No host synchronisation: all N x N⁻ pairs are formed (cuBLAS takes no device-side
// sizes, so the same-class blocks cannot be skipped without reading the class counts back; the
// Triton kernels skip them) and the epilogues mask the pairs of one class and the ignored
// anchors. The unit rows, the positive term, the class weights and the normalisation's backward
// are the shared driver's (common/contrastive_driver.h), in float32 (float64 for float64).
#include "common/cuda_binding.h"

#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common/contrastive_driver.h"
#include "memory_contrastive_loss/checks.h"
#include "memory_contrastive_loss/cuda.h"

namespace busseg::cuda {
namespace {

constexpr int64_t kTileRows = 2048;                 // anchors per tile
constexpr int64_t kTileCols = kContrastiveMaxCols;  // negatives per tile: a row in registers

at::Tensor wide(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? t : t.to(at::kFloat);
}

// A contiguous (rows, cols) view at the start of a flat buffer.
at::Tensor head(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// The operands of the tile products and the class keys of the epilogues (cuda.h): an anchor's
// class, -1 without loss; a negative's class, -2 outside [0, K).
struct Operands {
  at::Tensor a, n;
  at::Tensor anchor_keys, negative_keys;
};

Operands operands(const contrastive::Prepared& p, int64_t K, at::ScalarType dtype) {
  const at::Tensor in_range = (p.yn >= 0).logical_and(p.yn < K);
  return {p.a.to(dtype), p.n.to(dtype), at::where(p.weight > 0, p.ya, -1).to(at::kInt),
          at::where(in_range, p.yn, -2).to(at::kInt)};
}

// sim = a nᵀ in sim's (accumulator) type: half and bfloat16 operands with float32 output.
void similarities(at::Tensor& sim, const at::Tensor& a, const at::Tensor& n) {
  if (a.scalar_type() == sim.scalar_type())
    at::mm_out(sim, a, n.t());
  else
    at::mm_out(sim, a, n.t(), sim.scalar_type());
}

// out (accumulator type) += x y.
void add_product(at::Tensor out, const at::Tensor& x, const at::Tensor& y) {
  if (x.scalar_type() == out.scalar_type())
    out.addmm_(x, y);
  else
    out.add_(at::mm(x, y, out.scalar_type()));
}

ContrastiveTile tile_of(const Operands& ops, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
  return {rows, cols, ops.anchor_keys.data_ptr<int>() + i0, ops.negative_keys.data_ptr<int>() + j0};
}

// Calls f(i0, rows, j0, cols) for every tile, anchor blocks outer.
template <typename F>
void for_tiles(int64_t N, int64_t M, const F& f) {
  for (int64_t i0 = 0; i0 < N; i0 += kTileRows)
    for (int64_t j0 = 0; j0 < M; j0 += kTileCols)
      f(i0, std::min(kTileRows, N - i0), j0, std::min(kTileCols, M - j0));
}

// The flat buffers of one tile's similarities (accumulator type) and, for half operands, of the
// weights or gradients the next product reads (float32 and float64 tiles are rewritten in place).
struct TileBuffers {
  at::Tensor sim, operand;
  at::Tensor next(int64_t rows, int64_t cols, const at::Tensor& sim_tile) const {
    return operand.defined() ? head(operand, rows, cols) : sim_tile;
  }
};

TileBuffers tile_buffers(const contrastive::Prepared& p, const Operands& ops, bool with_operand) {
  const int64_t numel = std::min(kTileRows, p.a.size(0)) * std::min(kTileCols, p.n.size(0));
  TileBuffers b{at::empty({numel}, p.a.options()), at::Tensor()};
  if (with_operand && ops.a.scalar_type() != p.a.scalar_type())
    b.operand = at::empty({numel}, ops.a.options());
  return b;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> memory_contrastive_loss_cuda(
    const at::Tensor& anchors, const at::Tensor& anchor_labels, const at::Tensor& negatives,
    const at::Tensor& negative_labels, const at::Tensor& positives, const at::Tensor& has_positive,
    double temperature, bool save_weighted_negatives) {
  check_memory_contrastive_loss_args(anchors, anchor_labels, negatives, negative_labels, positives,
                                     has_positive, temperature);
  const c10::cuda::CUDAGuard guard(anchors.device());
  const at::ScalarType dtype = anchors.scalar_type();
  const int64_t K = positives.size(0);
  const contrastive::Prepared p =
      contrastive::prepare(wide(anchors), anchor_labels, wide(negatives), negative_labels,
                           wide(positives), has_positive, temperature);
  const bool save = save_weighted_negatives;
  at::Tensor m = p.pos.clone(), s = at::ones_like(p.pos);  // the positive term starts the sum
  at::Tensor wn = save ? at::zeros_like(p.a) : at::empty({0}, p.a.options());
  const int64_t N = p.a.size(0), M = p.n.size(0);
  if (N > 0 && M > 0) {
    const Operands ops = operands(p, K, dtype);
    const TileBuffers buf = tile_buffers(p, ops, save);
    at::Tensor alpha = save ? at::empty({std::min(kTileRows, N)}, p.a.options()) : at::Tensor();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    for_tiles(N, M, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
      at::Tensor sim = head(buf.sim, rows, cols);
      similarities(sim, ops.a.narrow(0, i0, rows), ops.n.narrow(0, j0, cols));
      const at::Tensor weights = save ? buf.next(rows, cols, sim) : at::Tensor();
      check_launch(
          memory_contrastive_loss_softmax_tile(
              dtype_of(sim), sim.data_ptr(), tile_of(ops, i0, rows, j0, cols),
              m.narrow(0, i0, rows).data_ptr(), s.narrow(0, i0, rows).data_ptr(), 1.0 / temperature,
              save ? dtype_of(weights) : dtype_of(sim), save ? weights.data_ptr() : nullptr,
              save ? alpha.data_ptr() : nullptr, stream),
          "memory_contrastive softmax tile");
      if (!save) return;
      // Σ_j e^{sim_ij/τ - m_i} n̂_j, rescaled as the running max moves
      at::Tensor wn_rows = wn.narrow(0, i0, rows);
      wn_rows.mul_(alpha.narrow(0, 0, rows).unsqueeze(1));
      add_product(wn_rows, weights, ops.n.narrow(0, j0, cols));
    });
  }
  auto [loss, lse] = contrastive::loss_from_running_lse(p, m, s);
  if (save) wn.div_(s.unsqueeze(1));  // rows without loss: 0 / 1
  return {loss.to(dtype), lse.to(dtype), wn.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor> memory_contrastive_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& anchors, const at::Tensor& anchor_labels,
    const at::Tensor& negatives, const at::Tensor& negative_labels, const at::Tensor& positives,
    const at::Tensor& has_positive, const at::Tensor& lse, const at::Tensor& weighted_negatives,
    double temperature, bool need_grad_negatives) {
  check_memory_contrastive_loss_backward_args(grad_loss, anchors, anchor_labels, negatives,
                                              negative_labels, positives, has_positive, lse,
                                              weighted_negatives, temperature);
  const c10::cuda::CUDAGuard guard(anchors.device());
  const int64_t K = positives.size(0);
  const contrastive::Prepared p =
      contrastive::prepare(wide(anchors), anchor_labels, wide(negatives), negative_labels,
                           wide(positives), has_positive, temperature);
  auto [l, coef, da, dn, tiles_for_anchors] =
      contrastive::backward_start(p, wide(grad_loss), wide(positives), wide(lse),
                                  wide(weighted_negatives), temperature, need_grad_negatives);
  const int64_t N = p.a.size(0), M = p.n.size(0);
  if ((tiles_for_anchors || need_grad_negatives) && N > 0 && M > 0) {
    const Operands ops = operands(p, K, anchors.scalar_type());
    const TileBuffers buf = tile_buffers(p, ops, true);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    for_tiles(N, M, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
      at::Tensor sim = head(buf.sim, rows, cols);
      const at::Tensor a_rows = ops.a.narrow(0, i0, rows), n_rows = ops.n.narrow(0, j0, cols);
      similarities(sim, a_rows, n_rows);
      const at::Tensor g = buf.next(rows, cols, sim);
      check_launch(memory_contrastive_loss_grad_tile(
                       dtype_of(sim), sim.data_ptr(), tile_of(ops, i0, rows, j0, cols),
                       l.narrow(0, i0, rows).data_ptr(), coef.narrow(0, i0, rows).data_ptr(),
                       1.0 / temperature, dtype_of(g), g.data_ptr(), stream),
                   "memory_contrastive gradient tile");
      if (tiles_for_anchors) add_product(da.narrow(0, i0, rows), g, n_rows);
      if (need_grad_negatives) add_product(dn.narrow(0, j0, cols), g.t(), a_rows);
    });
  }
  at::Tensor grad_anchors = contrastive::normalize_backward(wide(anchors), p.a, da);
  at::Tensor grad_negatives = need_grad_negatives
                                  ? contrastive::normalize_backward(wide(negatives), p.n, dn)
                                  : at::empty({0}, anchors.options());
  return {grad_anchors.to(anchors.scalar_type()), grad_negatives.to(negatives.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CUDA, m) {
  m.impl("memory_contrastive_loss", &memory_contrastive_loss_cuda);
  m.impl("memory_contrastive_loss_backward", &memory_contrastive_loss_backward_cuda);
}

}  // namespace busseg::cuda
