// Helpers of the ops' autograd in C++ (csrc/<op>/autograd.cpp, registered at the Autograd key, as
// torchvision registers its ops'): Python autograd (torch.library.register_autograd) cost about
// 16 us a call, more than a small kernel on a GPU. The fake kernels stay in Python (register_fake),
// so torch.compile and opcheck trace these through the dispatcher; the busseg_triton:: variants
// keep their Python autograd (busseg_ops/backends.py).
#pragma once
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include "common/signatures.h"

namespace busseg {

// The typed dispatcher handle of op `name` ("busseg::...", Signature from common/signatures.h).
// Calls go through the dispatcher, so that a tracing mode sees the op.
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Whether a call records the graph: grad mode on and a tensor argument (a Tensor or a TensorList)
// that requires grad. Otherwise an autograd kernel runs the op below autograd directly, without
// the node and context of a Function (the cost of a call under no_grad or on inputs without grad).
inline bool any_requires_grad(const at::Tensor& t) { return t.requires_grad(); }
inline bool any_requires_grad(at::TensorList ts) {
  for (const at::Tensor& t : ts)
    if (t.requires_grad()) return true;
  return false;
}
template <typename... Tensors>
bool records_grad(const Tensors&... tensors) {
  return c10::GradMode::is_enabled() && (any_requires_grad(tensors) || ...);
}

// How a backward op is called: with autocast off, and below autograd. With autocast off: called
// inside an autocast region (or traced there), the ATen products inside its kernels must not be
// cast to another dtype (the forward runs with autocast off already: an op's autocast kernel casts
// the inputs and turns it off before calling it). Below autograd: the saved inputs require grad,
// and every view the kernels' ATen calls take of them would otherwise go through autograd's view
// bookkeeping (the CRA backward on tiny inputs took 89 µs through the engine, 67 µs below it). The
// backward ops have no derivative: a backward with create_graph=True raises here, where autograd's
// fallback would warn and drop the second-order terms.
struct BackwardCall {
  explicit BackwardCall(const char* op) {
    TORCH_CHECK(!c10::GradMode::is_enabled(), op,
                ": no double backward (its backward has no derivative); call backward without "
                "create_graph=True");
  }
  c10::impl::ExcludeDispatchKeyGuard autocast_off{c10::autocast_dispatch_keyset};
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

}  // namespace busseg
