// busseg::memory_contrastive_loss (PH-Net Eq. 15; docs/ops.md): the tiled driver of the CPU entry
// points (arguments checked first: memory_contrastive_loss/checks.h), whose per-anchor steps serve
// the CUDA entry points too. Similarities are formed a tile at a time (at::mm) and folded into a
// per-anchor online log-sum-exp, so memory is O((N + N⁻)·D + tile), never O(N·N⁻); docs/kernels.md
// says how.
//
// Notation: â = anchors/‖anchors‖, n̂, p̂ likewise; pos_i = <â_i, p̂_{y_i}>/τ;
// lse_i = log(e^{pos_i} + Σ_{j: yn_j ≠ y_i} e^{<â_i, n̂_j>/τ}); ℓ_i = lse_i − pos_i;
// loss = Σ_i w_i ℓ_i with w_i = 1 / (#classes counted · #anchors of class y_i) for valid anchors
// (label in [0, K) with a positive), 0 otherwise.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>

namespace busseg {

// Tile kernels a device provides. `sim` is a (rows, cols) tile of raw dot products <â_i, n̂_j>.
struct ContrastiveTiles {
  // m, s (rows): running max and scaled sum; folds exp(sim/τ) of the entries with yn_j ≠ ya_i.
  void (*lse_update)(const at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                     at::Tensor& m, at::Tensor& s, double inv_tau);
  // In place: sim_ij ← coef_i · exp(sim_ij/τ − lse_i) where yn_j ≠ ya_i, else 0.
  void (*grad_tile)(at::Tensor& sim, const at::Tensor& ya, const at::Tensor& yn,
                    const at::Tensor& lse, const at::Tensor& coef, double inv_tau);
  int64_t tile;  // rows and columns of a tile
};

namespace contrastive {

constexpr double kNormEps = 1e-12;  // as torch.nn.functional.normalize

inline at::Tensor norms(const at::Tensor& x) { return x.norm(2, {1}, true).clamp_min(kNormEps); }

struct Prepared {
  at::Tensor a, n, ya, yn, pos, weight;  // normalised anchors / negatives, labels, pos, w
};

inline Prepared prepare(const at::Tensor& anchors, const at::Tensor& anchor_labels,
                        const at::Tensor& negatives, const at::Tensor& negative_labels,
                        const at::Tensor& positives, const at::Tensor& has_positive,
                        double temperature) {
  const int64_t K = positives.size(0);
  Prepared p;
  p.a = (anchors / norms(anchors)).contiguous();
  p.n = (negatives / norms(negatives)).contiguous();
  p.ya = anchor_labels.contiguous();
  p.yn = negative_labels.contiguous();
  const at::Tensor ph = positives / norms(positives);
  const at::Tensor inside = (p.ya >= 0).logical_and(p.ya < K);
  const at::Tensor lab = p.ya.clamp(0, K - 1);
  const at::Tensor valid = inside.logical_and(has_positive.index_select(0, lab));
  p.pos = (p.a * ph.index_select(0, lab)).sum(1) / temperature;
  const at::Tensor counts =
      at::zeros({K}, p.a.options()).index_add_(0, lab, valid.to(p.a.scalar_type()));
  const at::Tensor classes = (counts > 0).sum().clamp_min(1).to(p.a.scalar_type());
  p.weight = at::where(valid, 1.0 / (counts.index_select(0, lab).clamp_min(1) * classes),
                       at::zeros({}, p.a.options()));
  return p;
}

// Calls f(i0, rows, j0, cols) for every tile, anchor blocks outer.
template <typename F>
inline void for_tiles(int64_t N, int64_t M, int64_t tile, const F& f) {
  for (int64_t i0 = 0; i0 < N; i0 += tile)
    for (int64_t j0 = 0; j0 < M; j0 += tile)
      f(i0, std::min(tile, N - i0), j0, std::min(tile, M - j0));
}

// The valid anchors of one class and the negatives that count for them (label != c), gathered
// into contiguous blocks: only Σ_c N_c·(N⁻ − N⁻_c) similarities are formed (half of N·N⁻ for
// two balanced classes), and ignored anchors cost nothing.
struct ClassBlock {
  at::Tensor rows, cols;  // indices into anchors / negatives
  at::Tensor a, n, ya, yn;
};

template <typename F>
inline void for_classes(const Prepared& p, int64_t K, const F& f) {
  const at::Tensor valid = p.weight > 0;
  for (int64_t c = 0; c < K; ++c) {
    ClassBlock blk;
    blk.rows = valid.logical_and(p.ya == c).nonzero().squeeze(1);
    if (blk.rows.numel() == 0) continue;
    blk.cols = (p.yn != c).nonzero().squeeze(1);
    blk.a = p.a.index_select(0, blk.rows);
    blk.n = p.n.index_select(0, blk.cols);
    blk.ya = p.ya.index_select(0, blk.rows);
    blk.yn = p.yn.index_select(0, blk.cols);
    f(blk);
  }
}

// Backward of x̂ = x / max(‖x‖, eps): (dx̂ − x̂ <x̂, dx̂>) / ‖x‖ where ‖x‖ > eps, dx̂ / eps otherwise.
inline at::Tensor normalize_backward(const at::Tensor& x, const at::Tensor& xhat,
                                     const at::Tensor& dxhat) {
  const at::Tensor norm = x.norm(2, {1}, true);
  const at::Tensor proj = dxhat - xhat * (xhat * dxhat).sum(1, true);
  return at::where(norm > kNormEps, proj, dxhat) / norm.clamp_min(kNormEps);
}

// (loss, lse) from each anchor's running log-sum-exp (max m, scaled sum s, the positive included):
// ℓ = Σ_i w_i (lse_i − pos_i) over the anchors that have a positive (w_i > 0).
inline std::tuple<at::Tensor, at::Tensor> loss_from_running_lse(const Prepared& p,
                                                                const at::Tensor& m,
                                                                const at::Tensor& s) {
  const at::Tensor lse = m + s.log();
  const at::Tensor loss =
      (p.weight * at::where(p.weight > 0, lse - p.pos, at::zeros({}, lse.options()))).sum();
  return {loss, lse};
}

// The backward's start, before the tiles: coef_i = g·w_i/τ scales dℓ_i/dsim_ij = π_ij/τ (only
// anchors with a positive, w_i > 0, carry gradient); da holds the positive term's part of the
// gradient of the normalized anchors, coef_i (π_i,pos − 1) p̂_{y_i}, plus the negatives' part
// coef_i Σ_j π_ij n̂_j when forward saved it (weighted_negatives not empty); dn is zero (undefined
// without need_grad_negatives). The tiles add the rest: the negatives' part of da unless saved, dn.
struct BackwardStart {
  at::Tensor lse, coef, da, dn;
  bool tiles_for_anchors;  // da still needs the tiles
};

inline BackwardStart backward_start(const Prepared& p, const at::Tensor& grad_loss,
                                    const at::Tensor& positives, const at::Tensor& lse,
                                    const at::Tensor& weighted_negatives, double temperature,
                                    bool need_grad_negatives) {
  const int64_t K = positives.size(0);
  const at::Tensor l = lse.contiguous();
  const at::Tensor coef = (grad_loss.to(p.a.scalar_type()) * p.weight / temperature).contiguous();
  const at::Tensor ph = positives / norms(positives);
  const at::Tensor pi_pos = at::where(p.weight > 0, (p.pos - l).exp(), at::ones({}, l.options()));
  at::Tensor da = (coef * (pi_pos - 1)).unsqueeze(1) * ph.index_select(0, p.ya.clamp(0, K - 1));
  const bool saved = weighted_negatives.dim() == 2;  // else (0,): not saved
  if (saved) da += coef.unsqueeze(1) * weighted_negatives;
  at::Tensor dn = need_grad_negatives ? at::zeros_like(p.n) : at::Tensor();
  return {l, coef, da, dn, !saved};
}

}  // namespace contrastive

// Returns (loss, lse, weighted_negatives); weighted_negatives is (N, D) with
// save_weighted_negatives, else empty.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward(
    const ContrastiveTiles& tiles, const at::Tensor& anchors, const at::Tensor& anchor_labels,
    const at::Tensor& negatives, const at::Tensor& negative_labels, const at::Tensor& positives,
    const at::Tensor& has_positive, double temperature, bool save_weighted_negatives) {
  using namespace contrastive;
  const Prepared p = prepare(anchors, anchor_labels, negatives, negative_labels, positives,
                             has_positive, temperature);
  const bool save = save_weighted_negatives;
  at::Tensor m = p.pos.clone(), s = at::ones_like(p.pos);  // the positive term starts the sum
  at::Tensor wn = save ? at::zeros_like(p.a) : at::empty({0}, p.a.options());
  for_classes(p, positives.size(0), [&](const ClassBlock& blk) {
    at::Tensor mc = m.index_select(0, blk.rows), sc = s.index_select(0, blk.rows);
    at::Tensor wc = save ? at::zeros_like(blk.a) : at::Tensor();  // Σ_j e^{sim_ij/τ − m_i} n̂_j
    for_tiles(blk.a.size(0), blk.n.size(0), tiles.tile,
              [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
                const at::Tensor nb = blk.n.narrow(0, j0, cols);
                const at::Tensor ya = blk.ya.narrow(0, i0, rows), yn = blk.yn.narrow(0, j0, cols);
                at::Tensor sim = at::mm(blk.a.narrow(0, i0, rows), nb.t());
                at::Tensor mb = mc.narrow(0, i0, rows), sb = sc.narrow(0, i0, rows);
                const at::Tensor m_old = save ? mb.clone() : at::Tensor();
                tiles.lse_update(sim, ya, yn, mb, sb, 1.0 / temperature);
                if (!save) return;
                // sim ← e^{sim/τ − m_new} (the gradient tile with lse = the new max, coef = 1)
                tiles.grad_tile(sim, ya, yn, mb, at::ones_like(mb), 1.0 / temperature);
                wc.narrow(0, i0, rows).mul_((m_old - mb).exp().unsqueeze(1)).addmm_(sim, nb);
              });
    m.index_copy_(0, blk.rows, mc);
    s.index_copy_(0, blk.rows, sc);
    if (save) wn.index_copy_(0, blk.rows, wc / sc.unsqueeze(1));
  });
  auto [loss, lse] = loss_from_running_lse(p, m, s);
  return {loss, lse, wn};
}

inline std::tuple<at::Tensor, at::Tensor> contrastive_backward(
    const ContrastiveTiles& tiles, const at::Tensor& grad_loss, const at::Tensor& anchors,
    const at::Tensor& anchor_labels, const at::Tensor& negatives, const at::Tensor& negative_labels,
    const at::Tensor& positives, const at::Tensor& has_positive, const at::Tensor& lse,
    const at::Tensor& weighted_negatives, double temperature, bool need_grad_negatives) {
  using namespace contrastive;
  const Prepared p = prepare(anchors, anchor_labels, negatives, negative_labels, positives,
                             has_positive, temperature);
  const int64_t K = positives.size(0);
  auto [l, coef, da, dn, tiles_for_anchors] = backward_start(
      p, grad_loss, positives, lse, weighted_negatives, temperature, need_grad_negatives);
  if (tiles_for_anchors || need_grad_negatives) {
    for_classes(p, K, [&](const ClassBlock& blk) {
      const at::Tensor lc = l.index_select(0, blk.rows), cc = coef.index_select(0, blk.rows);
      at::Tensor dac = tiles_for_anchors ? at::zeros_like(blk.a) : at::Tensor();
      at::Tensor dnc = need_grad_negatives ? at::zeros_like(blk.n) : at::Tensor();
      for_tiles(blk.a.size(0), blk.n.size(0), tiles.tile,
                [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
                  const at::Tensor ab = blk.a.narrow(0, i0, rows), nb = blk.n.narrow(0, j0, cols);
                  at::Tensor g = at::mm(ab, nb.t());
                  tiles.grad_tile(g, blk.ya.narrow(0, i0, rows), blk.yn.narrow(0, j0, cols),
                                  lc.narrow(0, i0, rows), cc.narrow(0, i0, rows),
                                  1.0 / temperature);
                  if (tiles_for_anchors) dac.narrow(0, i0, rows).addmm_(g, nb);
                  if (need_grad_negatives) dnc.narrow(0, j0, cols).addmm_(g.t(), ab);
                });
      if (tiles_for_anchors) da.index_add_(0, blk.rows, dac);
      if (need_grad_negatives) dn.index_add_(0, blk.cols, dnc);
    });
  }
  at::Tensor grad_anchors = normalize_backward(anchors, p.a, da);
  at::Tensor grad_negatives = need_grad_negatives ? normalize_backward(negatives, p.n, dn)
                                                  : at::empty({0}, anchors.options());
  return {grad_anchors, grad_negatives};
}

}  // namespace busseg
