// Autograd of busseg::patch_entropy_hardness (common/autograd.h): forward runs the op below
// autograd and keeps x; backward calls busseg::patch_entropy_hardness_backward.
#include "common/autograd.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace busseg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor forward_below_autograd(const at::Tensor& x, int64_t patch_h, int64_t patch_w,
                                  bool from_logits, double eps) {
  static const auto op =
      typed_op<signature::patch_entropy_hardness>("busseg::patch_entropy_hardness");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, patch_h, patch_w, from_logits, eps);
}

class PatchEntropyHardness : public torch::autograd::Function<PatchEntropyHardness> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t patch_h,
                            int64_t patch_w, bool from_logits, double eps) {
    ctx->save_for_backward({x});
    ctx->saved_data["patch_h"] = patch_h;
    ctx->saved_data["patch_w"] = patch_w;
    ctx->saved_data["from_logits"] = from_logits;
    ctx->saved_data["eps"] = eps;
    return forward_below_autograd(x, patch_h, patch_w, from_logits, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<signature::patch_entropy_hardness_backward>(
        "busseg::patch_entropy_hardness_backward");
    const BackwardCall backward_call("busseg::patch_entropy_hardness");
    const at::Tensor grad_x =
        op.call(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["patch_h"].toInt(),
                ctx->saved_data["patch_w"].toInt(), ctx->saved_data["from_logits"].toBool(),
                ctx->saved_data["eps"].toDouble());
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor patch_entropy_hardness_autograd(const at::Tensor& x, int64_t patch_h, int64_t patch_w,
                                           bool from_logits, double eps) {
  if (!records_grad(x)) return forward_below_autograd(x, patch_h, patch_w, from_logits, eps);
  return PatchEntropyHardness::apply(x, patch_h, patch_w, from_logits, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, Autograd, m) {
  m.impl("patch_entropy_hardness", &patch_entropy_hardness_autograd);
}

}  // namespace busseg
