// Autograd of busseg::cross_layer_alignment_loss (common/autograd.h): forward runs the op below
// autograd and keeps the inputs, the per-row log-sum-exp and, when it formed them, the proxy
// gradients for a unit grad_loss (neither differentiable); backward scales those, or calls
// busseg::cross_layer_alignment_loss_backward for the gradients the inputs need.
#include "common/autograd.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace busseg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Outputs = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>;

Outputs forward_below_autograd(at::TensorList feats, at::TensorList proxies,
                               c10::string_view reduction, double eps, int64_t block_rows,
                               bool grad_proxies) {
  static const auto op =
      typed_op<signature::cross_layer_alignment_loss>("busseg::cross_layer_alignment_loss");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(feats, proxies, reduction, eps, block_rows, grad_proxies);
}

class CrossLayerAlignmentLoss : public torch::autograd::Function<CrossLayerAlignmentLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList feats, at::TensorList proxies,
                               c10::string_view reduction, double eps, int64_t block_rows,
                               bool grad_proxies) {
    auto [loss, lse, unit_grads] =
        forward_below_autograd(feats, proxies, reduction, eps, block_rows, grad_proxies);
    variable_list saved(feats.begin(), feats.end());
    saved.insert(saved.end(), proxies.begin(), proxies.end());
    saved.push_back(lse);
    saved.insert(saved.end(), unit_grads.begin(), unit_grads.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["layers"] = static_cast<int64_t>(feats.size());
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["block_rows"] = block_rows;
    variable_list out{loss, lse};
    out.insert(out.end(), unit_grads.begin(), unit_grads.end());
    ctx->mark_non_differentiable(variable_list(out.begin() + 1, out.end()));
    ctx->set_materialize_grads(false);  // no zero gradients of lse and the unit gradients
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<signature::cross_layer_alignment_loss_backward>(
        "busseg::cross_layer_alignment_loss_backward");
    const int64_t L = ctx->saved_data["layers"].toInt();
    variable_list result(2 * L + 4);  // feats, proxies, and no gradient of the four parameters
    const at::Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return result;
    const BackwardCall backward_call("busseg::cross_layer_alignment_loss");
    const variable_list saved = ctx->get_saved_variables();
    const at::TensorList feats(saved.data(), L), proxies(saved.data() + L, L);
    const at::Tensor& lse = saved[2 * L];
    const at::TensorList unit_grads(saved.data() + 2 * L + 1, saved.size() - (2 * L + 1));
    bool need_feats = false, want_proxies = false;
    for (int64_t l = 0; l < L; ++l) {
      need_feats |= ctx->needs_input_grad(l);
      want_proxies |= ctx->needs_input_grad(L + l);
    }
    const bool need_proxies = want_proxies && unit_grads.empty();
    if (need_feats || need_proxies) {
      auto [grad_feats, grad_proxies] =
          op.call(grad_loss, feats, proxies, lse, ctx->saved_data["reduction"].toStringRef(),
                  ctx->saved_data["eps"].toDouble(), ctx->saved_data["block_rows"].toInt(),
                  need_feats, need_proxies);
      for (int64_t l = 0; l < L; ++l) {
        if (need_feats && ctx->needs_input_grad(l)) result[l] = grad_feats[l];
        if (need_proxies && ctx->needs_input_grad(L + l)) result[L + l] = grad_proxies[l];
      }
    }
    if (!unit_grads.empty()) {  // formed in forward for grad_loss = 1
      for (int64_t l = 0; l < L; ++l)
        if (ctx->needs_input_grad(L + l)) result[L + l] = grad_loss.mul(unit_grads[l]);
    }
    return result;
  }
};

Outputs cross_layer_alignment_loss_autograd(at::TensorList feats, at::TensorList proxies,
                                            c10::string_view reduction, double eps,
                                            int64_t block_rows, bool grad_proxies) {
  if (!records_grad(feats, proxies))
    return forward_below_autograd(feats, proxies, reduction, eps, block_rows, grad_proxies);
  const variable_list out =
      CrossLayerAlignmentLoss::apply(feats, proxies, reduction, eps, block_rows, grad_proxies);
  return {out[0], out[1], std::vector<at::Tensor>(out.begin() + 2, out.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, Autograd, m) {
  m.impl("cross_layer_alignment_loss", &cross_layer_alignment_loss_autograd);
}

}  // namespace busseg
