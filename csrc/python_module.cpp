// Makes the library importable as busseg_ops._C (importing it runs the op registrations), and
// gives the Python front ends a direct call of each native op: native_op(name, fallback) returns a
// callable that converts plain Python arguments (exact tensors, ints, floats, bools, strs, lists of
// tensors) to the op's C++ signature (common/signatures.h) and calls it through the dispatcher,
// so autograd, autocast and dispatch modes apply as for any call. torch.ops' boxed call (a stack
// built from the schema, torch-function handling) costs about 1.4 µs more, a fifth of a small op's
// whole call. Anything else (a tensor subclass, an active torch-function mode, a SymInt, keyword
// arguments, another count) goes to `fallback`, the op's torch.ops overload, which handles it as
// before.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/signatures.h"

namespace {

// How an argument of the signature is held during the call.
template <typename T>
struct Held {
  using type = std::decay_t<T>;
};
template <>
struct Held<at::TensorList> {
  using type = std::vector<at::Tensor>;
};
template <>
struct Held<c10::string_view> {
  using type = std::string;
};

// Python -> C++ for the plain kinds; false for anything else (that call takes the fallback).
bool from_python(PyObject* o, at::Tensor& out) {
  if (!THPVariable_CheckExact(o)) return false;
  out = THPVariable_Unpack(o);
  return true;
}
bool from_python(PyObject* o, int64_t& out) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  out = PyLong_AsLongLongAndOverflow(o, &overflow);
  return overflow == 0;
}
bool from_python(PyObject* o, double& out) {
  if (!PyFloat_CheckExact(o)) return false;
  out = PyFloat_AS_DOUBLE(o);
  return true;
}
bool from_python(PyObject* o, bool& out) {
  if (!PyBool_Check(o)) return false;
  out = o == Py_True;
  return true;
}
bool from_python(PyObject* o, std::string& out) {
  Py_ssize_t size = 0;
  const char* data = PyUnicode_CheckExact(o) ? PyUnicode_AsUTF8AndSize(o, &size) : nullptr;
  if (data == nullptr) {
    PyErr_Clear();
    return false;
  }
  out.assign(data, size);
  return true;
}
bool from_python(PyObject* o, std::vector<at::Tensor>& out) {
  if (!PyList_CheckExact(o)) return false;
  out.resize(PyList_GET_SIZE(o));
  for (size_t i = 0; i < out.size(); ++i)
    if (!from_python(PyList_GET_ITEM(o, i), out[i])) return false;
  return true;
}

// C++ -> Python: a tensor, a list of tensors, a tuple of those (new references).
PyObject* to_python(at::Tensor t) {
  PyObject* o = THPVariable_Wrap(std::move(t));
  if (o == nullptr) throw python_error();
  return o;
}
PyObject* to_python(std::vector<at::Tensor> ts) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(ts.size()));
  if (list == nullptr) throw python_error();
  for (size_t i = 0; i < ts.size(); ++i) {
    PyObject* item = THPVariable_Wrap(std::move(ts[i]));
    if (item == nullptr) {
      Py_DECREF(list);
      throw python_error();
    }
    PyList_SET_ITEM(list, i, item);
  }
  return list;
}
template <typename... T>
PyObject* to_python(std::tuple<T...> values) {
  PyObject* tuple = PyTuple_New(sizeof...(T));
  if (tuple == nullptr) throw python_error();
  try {
    [&]<size_t... I>(std::index_sequence<I...>) {
      (PyTuple_SET_ITEM(tuple, I, to_python(std::move(std::get<I>(values)))), ...);
    }(std::index_sequence_for<T...>{});
  } catch (...) {
    Py_DECREF(tuple);
    throw;
  }
  return tuple;
}

// The GIL released while the op runs (as torch.ops' call does); a Python kernel takes it back.
struct ReleasedGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleasedGil() { PyEval_RestoreThread(state); }
};

constexpr const char* kCapsule = "busseg_ops._C.native_op";

template <typename Signature>
struct NativeOp;

template <typename Return, typename... Args>
struct NativeOp<Return(Args...)> {
  c10::TypedOperatorHandle<Return(Args...)> op;
  PyObject* fallback;  // owned

  static PyObject* call(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                        PyObject* kwnames) {
    HANDLE_TH_ERRORS
    const auto* me = static_cast<NativeOp*>(PyCapsule_GetPointer(self, kCapsule));
    std::tuple<typename Held<Args>::type...> held;
    const bool plain = [&]<size_t... I>(std::index_sequence<I...>) {
      return nargs == sizeof...(Args) && kwnames == nullptr &&
             !at::impl::torch_function_mode_enabled() &&
             (from_python(args[I], std::get<I>(held)) && ...);
    }(std::index_sequence_for<Args...>{});
    if (!plain) return PyObject_Vectorcall(me->fallback, args, nargs, kwnames);
    Return result = [&] {
      const ReleasedGil released;
      return std::apply([&](const auto&... a) { return me->op.call(a...); }, held);
    }();
    return to_python(std::move(result));
    END_HANDLE_TH_ERRORS
  }

  static void destroy(PyObject* capsule) {
    auto* me = static_cast<NativeOp*>(PyCapsule_GetPointer(capsule, kCapsule));
    Py_DECREF(me->fallback);
    delete me;
  }

  static PyObject* make(const std::string& name, PyObject* fallback) {
    static PyMethodDef def{"native_op",
                           reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&call)),
                           METH_FASTCALL | METH_KEYWORDS, nullptr};
    auto* me = new NativeOp{c10::Dispatcher::singleton()
                                .findSchemaOrThrow(("busseg::" + name).c_str(), "")
                                .typed<Return(Args...)>(),
                            fallback};
    Py_INCREF(fallback);
    PyObject* capsule = PyCapsule_New(me, kCapsule, &destroy);
    if (capsule == nullptr) {
      Py_DECREF(fallback);
      delete me;
      return nullptr;
    }
    PyObject* function = PyCFunction_New(&def, capsule);
    Py_DECREF(capsule);
    return function;
  }
};

// native_op(name, fallback): the direct call of busseg::<name>, or `fallback` itself for an op
// without an entry here.
PyObject* native_op(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2 && PyUnicode_Check(args[0]), "native_op(name: str, fallback)");
  const std::string name = PyUnicode_AsUTF8(args[0]);
  namespace s = busseg::signature;
  if (name == "adjacent_relation_propagation")
    return NativeOp<s::adjacent_relation_propagation>::make(name, args[1]);
  if (name == "cross_layer_alignment_loss")
    return NativeOp<s::cross_layer_alignment_loss>::make(name, args[1]);
  if (name == "memory_contrastive_loss")
    return NativeOp<s::memory_contrastive_loss>::make(name, args[1]);
  if (name == "patch_entropy_hardness")
    return NativeOp<s::patch_entropy_hardness>::make(name, args[1]);
  if (name == "greedy_proxy_sampling")
    return NativeOp<s::greedy_proxy_sampling>::make(name, args[1]);
  if (name == "adaptive_patch_cutmix")
    return NativeOp<s::adaptive_patch_cutmix>::make(name, args[1]);
  Py_INCREF(args[1]);
  return args[1];
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"native_op", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&native_op)),
     METH_FASTCALL, "native_op(name, fallback): the direct call of the native op busseg::<name>"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
