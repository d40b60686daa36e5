// Autograd of busseg::adjacent_relation_propagation (common/autograd.h): forward runs the op below
// autograd and keeps feat, value and the softmax weights (not differentiable); backward calls
// busseg::adjacent_relation_propagation_backward for the gradients the inputs need.
#include "common/autograd.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace busseg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> forward_below_autograd(const at::Tensor& feat,
                                                          const at::Tensor& value,
                                                          int64_t kernel_size, int64_t dilation,
                                                          double scale, bool valid_padding) {
  static const auto op =
      typed_op<signature::adjacent_relation_propagation>("busseg::adjacent_relation_propagation");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(feat, value, kernel_size, dilation, scale, valid_padding);
}

class AdjacentRelationPropagation : public torch::autograd::Function<AdjacentRelationPropagation> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& feat,
                               const at::Tensor& value, int64_t kernel_size, int64_t dilation,
                               double scale, bool valid_padding) {
    auto [out, weights] =
        forward_below_autograd(feat, value, kernel_size, dilation, scale, valid_padding);
    ctx->save_for_backward({feat, value, weights});
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["valid_padding"] = valid_padding;
    ctx->mark_non_differentiable({weights});
    ctx->set_materialize_grads(false);  // no zero gradient of the weights
    return {out, weights};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<signature::adjacent_relation_propagation_backward>(
        "busseg::adjacent_relation_propagation_backward");
    variable_list result(6);  // feat, value, and no gradient of the four parameters
    if (!grads[0].defined()) return result;
    const BackwardCall backward_call("busseg::adjacent_relation_propagation");
    const variable_list saved = ctx->get_saved_variables();
    const bool need_feat = ctx->needs_input_grad(0), need_value = ctx->needs_input_grad(1);
    auto [grad_feat, grad_value] =
        op.call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["kernel_size"].toInt(),
                ctx->saved_data["dilation"].toInt(), ctx->saved_data["scale"].toDouble(),
                ctx->saved_data["valid_padding"].toBool(), need_feat, need_value);
    if (need_feat) result[0] = grad_feat;
    if (need_value) result[1] = grad_value;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> adjacent_relation_propagation_autograd(
    const at::Tensor& feat, const at::Tensor& value, int64_t kernel_size, int64_t dilation,
    double scale, bool valid_padding) {
  if (!records_grad(feat, value))
    return forward_below_autograd(feat, value, kernel_size, dilation, scale, valid_padding);
  const variable_list out =
      AdjacentRelationPropagation::apply(feat, value, kernel_size, dilation, scale, valid_padding);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, Autograd, m) {
  m.impl("adjacent_relation_propagation", &adjacent_relation_propagation_autograd);
}

}  // namespace busseg
