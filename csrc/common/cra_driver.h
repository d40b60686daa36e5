// busseg::cross_layer_alignment_loss (RA-BUSSeg CRA; docs/ops.md): the device-independent driver
// of the CPU and CUDA entry points (arguments checked first: cross_layer_alignment_loss/checks.h).
// Pixel rows go in blocks, each block's logits into one buffer with a fused row kernel after them,
// so no (L, B, HW, M) tensor ever exists; docs/kernels.md says how.
//
// Layouts: feats[l] (B, C_l, HW) (the usual NCHW map flattened: a view, no copy; any strides),
// proxies[l] (B, M, C_l), lse (L, B, HW) in the accumulator type (double for f64, else float).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace busseg {

// The matrix products of one loss call, by at::bmm. A device may substitute faster ones for the
// inputs it can take (the CPU's AVX-512 kernels for float).
class AlignProducts {
 public:
  AlignProducts(at::TensorList feats, at::TensorList proxies)
      : feats_(feats.vec()), proxies_(proxies.vec()) {}
  virtual ~AlignProducts() = default;

  // logits (L, B, n, M) of pixel rows [r0, r0 + n) into z (contiguous)
  virtual void logits(int64_t r0, int64_t n, at::Tensor& z) {
    for (size_t l = 0; l < feats_.size(); ++l) {
      at::Tensor out = z.select(0, static_cast<int64_t>(l));
      at::bmm_out(out, feats_[l].narrow(2, r0, n).transpose(1, 2), proxies_[l].transpose(1, 2));
    }
  }

  // proxy gradient l += g_lᵀ f_l[:, :, r0:r0+n]ᵀ for the gradient block g (L, B, n, M)
  virtual void accumulate_proxy_grads(const at::Tensor& g, int64_t r0, int64_t n) {
    if (grads_.empty())  // sums over blocks in the accumulator type, (B, M, C_l)
      for (const at::Tensor& p : proxies_)
        grads_.push_back(
            at::zeros(p.sizes(), p.options().dtype(at::toOpMathType(p.scalar_type()))));
    for (size_t l = 0; l < feats_.size(); ++l) {
      const at::Tensor gl = g.select(0, static_cast<int64_t>(l)).transpose(1, 2);  // (B, M, n)
      const at::Tensor fl = feats_[l].narrow(2, r0, n).transpose(1, 2);            // (B, n, C)
      if (grads_[l].scalar_type() == fl.scalar_type())
        grads_[l].baddbmm_(gl, fl);
      else  // half / bfloat16 inputs: products in their dtype, the sum over blocks in float
        grads_[l].add_(at::bmm(gl, fl));
    }
  }

  // the accumulated proxy gradients, (B, M, C_l) in the inputs' dtype
  virtual std::vector<at::Tensor> proxy_grads() {
    std::vector<at::Tensor> out;
    for (size_t l = 0; l < grads_.size(); ++l)
      out.push_back(grads_[l].to(proxies_[l].scalar_type()));
    return out;
  }

 protected:
  std::vector<at::Tensor> feats_, proxies_;

 private:
  std::vector<at::Tensor> grads_;
};

// What a device provides: fused row kernels on a contiguous block of R pixel rows, and
// optionally its own products.
struct AlignKernels {
  // logits (L, R, M) -> lse (L, R) (accumulator type, contiguous, written); returns the sum of
  // the rows' KL terms Σ_l Σ_m q (log q − log(p + eps)) as a 0-dim accumulator-type tensor.
  at::Tensor (*forward)(const at::Tensor& logits, double eps, at::Tensor& lse);
  // grad (L, R, M) = grad_loss · norm · ∂(sum of the rows' KL terms)/∂logits (grad_loss is a
  // 0-dim tensor on the device; grad does not alias logits).
  void (*backward)(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& lse,
                   double eps, double norm, at::Tensor& grad);
  // The products for these (checked) inputs; nullptr: AlignProducts.
  std::unique_ptr<AlignProducts> (*products)(at::TensorList feats, at::TensorList proxies);
  // The dtype of the logit blocks for inputs of `dtype` (the products then write it and the row
  // kernels read it; the logit gradients stay in the inputs' dtype); nullptr: the inputs' own.
  at::ScalarType (*logits_type)(at::ScalarType dtype) = nullptr;

  std::unique_ptr<AlignProducts> products_for(at::TensorList feats, at::TensorList proxies) const {
    return products ? products(feats, proxies) : std::make_unique<AlignProducts>(feats, proxies);
  }
  at::TensorOptions logits_options(const at::Tensor& f0) const {
    return f0.options().dtype(logits_type ? logits_type(f0.scalar_type()) : f0.scalar_type());
  }
};

struct AlignShape4 {
  int64_t L, B, HW, M;
};

// The shape of checked inputs (cross_layer_alignment_loss/checks.h); `norm` gets the factor on
// the summed KL terms: 1 / ((L - 1) * d), d = B*HW*M ("mean"), B ("batchmean") or 1 ("sum").
inline AlignShape4 align_shape(at::TensorList feats, at::TensorList proxies,
                               const std::string& reduction, double* norm) {
  const AlignShape4 s{static_cast<int64_t>(feats.size()), feats[0].size(0), feats[0].size(2),
                      proxies[0].size(1)};
  const double pairs = static_cast<double>(s.L - 1);
  if (reduction == "mean")
    *norm = 1.0 / (pairs * static_cast<double>(s.B * s.HW * s.M));
  else if (reduction == "batchmean")
    *norm = 1.0 / (pairs * static_cast<double>(s.B));
  else
    *norm = 1.0 / pairs;
  return s;
}

namespace align {

// A contiguous (dims) view at the start of `buf` (a flat buffer big enough for any block).
inline at::Tensor head(const at::Tensor& buf, at::IntArrayRef dims) {
  return buf.narrow(0, 0, c10::multiply_integers(dims)).view(dims);
}

// Rows per block: at most block_rows, balanced over the blocks.
inline int64_t rows_per_block(int64_t HW, int64_t block_rows) {
  block_rows = std::min(block_rows, HW);  // (block_rows may be anything up to 2^63 - 1)
  const int64_t blocks = (HW + block_rows - 1) / block_rows;
  return (HW + blocks - 1) / blocks;
}

}  // namespace align

// Returns (loss, lse (L, B, HW), grad_proxies). With `grad_proxies` the proxy gradients for a
// unit grad_loss are formed here too, from the logit block that is already in the buffer:
// backward then only scales them, and no logit block is recomputed (used when only the
// proxies need a gradient, the upstream setting with detached feature maps). Otherwise the list
// is empty.
inline std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> align_blocked_forward(
    const AlignKernels& k, at::TensorList feats, at::TensorList proxies,
    const std::string& reduction, double eps, int64_t block_rows, bool grad_proxies) {
  double norm = 0;
  const AlignShape4 s = align_shape(feats, proxies, reduction, &norm);
  const at::Tensor& f0 = feats[0];
  const at::ScalarType dtype = f0.scalar_type(), acc_type = at::toOpMathType(dtype);
  const auto acc = f0.options().dtype(acc_type);
  const int64_t rows = align::rows_per_block(s.HW, block_rows);
  at::Tensor lse = at::empty({s.L, s.B, s.HW}, acc);
  const at::Tensor zbuf = at::empty({s.L * s.B * rows * s.M}, k.logits_options(f0));
  const at::Tensor lbuf = at::empty({s.L * s.B * rows}, acc);
  at::Tensor gbuf, unit;
  if (grad_proxies) {
    gbuf = at::empty({s.L * s.B * rows * s.M}, f0.options());
    unit = at::ones({}, f0.options());
  }
  const std::unique_ptr<AlignProducts> products = k.products_for(feats, proxies);
  at::Tensor total = at::zeros({}, acc);
  for (int64_t r0 = 0; r0 < s.HW; r0 += rows) {
    const int64_t n = std::min(rows, s.HW - r0);
    at::Tensor z = align::head(zbuf, {s.L, s.B, n, s.M});
    products->logits(r0, n, z);
    at::Tensor bl = align::head(lbuf, {s.L, s.B * n});
    const at::Tensor zv = z.view({s.L, s.B * n, s.M});
    total.add_(k.forward(zv, eps, bl));
    lse.narrow(2, r0, n).copy_(bl.view({s.L, s.B, n}));
    if (grad_proxies) {
      at::Tensor g = align::head(gbuf, {s.L, s.B, n, s.M});
      at::Tensor gv = g.view({s.L, s.B * n, s.M});
      k.backward(unit, zv, bl, eps, norm, gv);
      products->accumulate_proxy_grads(g, r0, n);
    }
  }
  return {(total * norm).to(dtype), lse,
          grad_proxies ? products->proxy_grads() : std::vector<at::Tensor>()};
}

// Returns (grad_feats, grad_proxies): lists of L (B, C_l, HW) / (B, M, C_l) tensors, each empty
// when not asked for.
inline std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> align_blocked_backward(
    const AlignKernels& k, const at::Tensor& grad_loss, at::TensorList feats,
    at::TensorList proxies, const at::Tensor& lse, const std::string& reduction, double eps,
    int64_t block_rows, bool need_grad_feats, bool need_grad_proxies) {
  double norm = 0;
  const AlignShape4 s = align_shape(feats, proxies, reduction, &norm);
  const at::Tensor& f0 = feats[0];
  const at::ScalarType acc_type = at::toOpMathType(f0.scalar_type());
  std::vector<at::Tensor> grad_feats, grad_proxies;
  if (!need_grad_feats && !need_grad_proxies) return {grad_feats, grad_proxies};
  if (need_grad_feats)
    for (const at::Tensor& f : feats) grad_feats.push_back(at::empty(f.sizes(), f.options()));
  const std::unique_ptr<AlignProducts> products = k.products_for(feats, proxies);
  const int64_t rows = align::rows_per_block(s.HW, block_rows);
  const at::Tensor zbuf = at::empty({s.L * s.B * rows * s.M}, k.logits_options(f0));
  const at::Tensor gbuf = at::empty({s.L * s.B * rows * s.M}, f0.options());
  const at::Tensor lbuf = at::empty({s.L * s.B * rows}, f0.options().dtype(acc_type));
  const at::Tensor g_loss = grad_loss.reshape({}).to(f0.options());
  const at::Tensor saved = lse.to(acc_type);
  for (int64_t r0 = 0; r0 < s.HW; r0 += rows) {
    const int64_t n = std::min(rows, s.HW - r0);
    at::Tensor z = align::head(zbuf, {s.L, s.B, n, s.M});
    products->logits(r0, n, z);
    at::Tensor bl = align::head(lbuf, {s.L, s.B, n});
    bl.copy_(saved.narrow(2, r0, n));
    at::Tensor g = align::head(gbuf, {s.L, s.B, n, s.M});
    at::Tensor gv = g.view({s.L, s.B * n, s.M});
    k.backward(g_loss, z.view({s.L, s.B * n, s.M}), bl.view({s.L, s.B * n}), eps, norm, gv);
    if (need_grad_proxies) products->accumulate_proxy_grads(g, r0, n);
    if (need_grad_feats)  // f_l[:, :, block] gradient = (g_l p_l)ᵀ
      for (int64_t l = 0; l < s.L; ++l)
        grad_feats[l].narrow(2, r0, n).copy_(
            at::bmm(proxies[l].transpose(1, 2), g.select(0, l).transpose(1, 2)));
  }
  if (need_grad_proxies) grad_proxies = products->proxy_grads();
  return {grad_feats, grad_proxies};
}

}  // namespace busseg
