// Autograd of busseg::memory_contrastive_loss (common/autograd.h): forward runs the op below
// autograd and keeps the inputs, the anchors' log-sum-exp and the saved Σπ·n̂ (neither
// differentiable); backward calls busseg::memory_contrastive_loss_backward (the anchors' gradient
// always, the negatives' when they need one; never the positives').
#include "common/autograd.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace busseg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Outputs forward_below_autograd(const at::Tensor& anchors, const at::Tensor& anchor_labels,
                               const at::Tensor& negatives, const at::Tensor& negative_labels,
                               const at::Tensor& positives, const at::Tensor& has_positive,
                               double temperature, bool save_weighted_negatives) {
  static const auto op =
      typed_op<signature::memory_contrastive_loss>("busseg::memory_contrastive_loss");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(anchors, anchor_labels, negatives, negative_labels, positives, has_positive,
                 temperature, save_weighted_negatives);
}

class MemoryContrastiveLoss : public torch::autograd::Function<MemoryContrastiveLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& anchors,
                               const at::Tensor& anchor_labels, const at::Tensor& negatives,
                               const at::Tensor& negative_labels, const at::Tensor& positives,
                               const at::Tensor& has_positive, double temperature,
                               bool save_weighted_negatives) {
    auto [loss, lse, weighted_negatives] =
        forward_below_autograd(anchors, anchor_labels, negatives, negative_labels, positives,
                               has_positive, temperature, save_weighted_negatives);
    ctx->save_for_backward({anchors, anchor_labels, negatives, negative_labels, positives,
                            has_positive, lse, weighted_negatives});
    ctx->saved_data["temperature"] = temperature;
    ctx->mark_non_differentiable({lse, weighted_negatives});
    ctx->set_materialize_grads(false);  // no zero gradients of lse and weighted_negatives
    return {loss, lse, weighted_negatives};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<signature::memory_contrastive_loss_backward>(
        "busseg::memory_contrastive_loss_backward");
    variable_list result(8);  // anchors and negatives; the labels, positives and parameters none
    if (!grads[0].defined()) return result;
    const BackwardCall backward_call("busseg::memory_contrastive_loss");
    const variable_list s = ctx->get_saved_variables();
    const bool need_negatives = ctx->needs_input_grad(2);
    auto [grad_anchors, grad_negatives] =
        op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
                ctx->saved_data["temperature"].toDouble(), need_negatives);
    result[0] = grad_anchors;
    if (need_negatives) result[2] = grad_negatives;
    return result;
  }
};

Outputs memory_contrastive_loss_autograd(const at::Tensor& anchors, const at::Tensor& anchor_labels,
                                         const at::Tensor& negatives,
                                         const at::Tensor& negative_labels,
                                         const at::Tensor& positives,
                                         const at::Tensor& has_positive, double temperature,
                                         bool save_weighted_negatives) {
  // The positives get no gradient, but as with any op the loss requires grad when they do.
  if (!records_grad(anchors, negatives, positives))
    return forward_below_autograd(anchors, anchor_labels, negatives, negative_labels, positives,
                                  has_positive, temperature, save_weighted_negatives);
  const variable_list out =
      MemoryContrastiveLoss::apply(anchors, anchor_labels, negatives, negative_labels, positives,
                                   has_positive, temperature, save_weighted_negatives);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, Autograd, m) {
  m.impl("memory_contrastive_loss", &memory_contrastive_loss_autograd);
}

}  // namespace busseg
