// cpu_kernels_torch.h's functions, on torch's C++ API. Compiled against the installed torch's
// headers (C++20, torch's C++ ABI) into the "torch" build of the extension module only; see the
// header for why. No C++ exception leaves this file: each becomes a false answer (read) or a
// Python error (the constructors).
#include "cpu_kernels_torch.h"

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/PyInterpreter.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <new>

namespace bnlab_torch {
namespace {

int code_of(c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::Float: return 0;
    case c10::ScalarType::Double: return 1;
    case c10::ScalarType::BFloat16: return 2;
    case c10::ScalarType::Half: return 3;
    default: return -1;
  }
}

c10::ScalarType type_of(int code) {
  constexpr c10::ScalarType kTypes[] = {c10::ScalarType::Float, c10::ScalarType::Double, c10::ScalarType::BFloat16,
                                        c10::ScalarType::Half};
  return kTypes[code];
}

// A new Python reference to t with *ptr its data; nullptr with the error set if wrapping failed.
PyObject* wrap(at::Tensor t, int64_t* ptr) {
  if (ptr != nullptr) *ptr = (int64_t)(intptr_t)t.data_ptr();
  return THPVariable_Wrap(std::move(t));
}

// Runs make() (which returns a new reference or nullptr), turning a C++ exception into a Python error.
template <typename Make>
PyObject* guarded(Make make) {
  try {
    return make();
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "bnlab: an unknown C++ exception in torch");
  }
  return nullptr;
}

}  // namespace

bool read(PyObject* o, Facts* f) {
  try {
    if (!THPVariable_Check(o)) return false;
    const at::Tensor& t = THPVariable_Unpack(o);
    if (!t.defined() || t.layout() != c10::kStrided || t.is_neg() || t.is_conj()) return false;
    const int64_t ndim = t.dim();
    if (ndim > kMaxDims) return false;
    const c10::IntArrayRef size = t.sizes(), stride = t.strides();  // throw for symbolic sizes: caught
    f->ndim = (int)ndim;
    f->numel = 1;
    for (int64_t d = 0; d < ndim; ++d) {
      f->size[d] = size[d], f->stride[d] = stride[d];
      f->numel *= size[d];
    }
    f->code = code_of(t.scalar_type());
    f->cpu = t.device().is_cpu();
    f->requires_grad = t.requires_grad();
    // As x.data_ptr() reads it (a copy-on-write storage is materialised, as there); a tensor
    // without memory torch lets us see throws, and is declined.
    f->ptr = f->cpu && f->numel > 0 ? (int64_t)(intptr_t)t.data_ptr() : 0;
    return true;
  } catch (...) {
    return false;
  }
}

// The type of torch.set_default_device's mode, torch.utils._device.DeviceContext (borrowed), or
// nullptr while that module is not imported (then no such mode can be active). Looked up in
// sys.modules without importing, so the GIL is never released here.
static PyObject* device_context_type() {
  static PyObject* type = nullptr;  // a reference kept for the process's life
  static PyObject* module_name = PyUnicode_InternFromString("torch.utils._device");
  if (type == nullptr && module_name != nullptr) {
    PyObject* module = PyImport_GetModule(module_name);
    if (module != nullptr) type = PyObject_GetAttrString(module, "DeviceContext");
    Py_XDECREF(module);
  }
  if (type == nullptr) PyErr_Clear();
  return type;
}

// torch.set_default_device's mode does not count: it only fills in the device of torch's factory
// functions called from Python, and the compiled calls make their outputs here, on the CPU.
// (Declining under it would send every call of a program that set a default device to the
// Python path.)
bool modes_active() {
  if (c10::impl::dispatch_mode_enabled()) return true;
  if (!at::impl::torch_function_mode_enabled()) return false;
  PyObject* device_context = device_context_type();
  const int64_t depth = at::impl::PythonTorchFunctionTLS::stack_len();
  for (int64_t i = 0; i < depth; ++i) {
    PyObject* mode = at::impl::PythonTorchFunctionTLS::get_stack_at(i)->ptr(getPyInterpreter());
    if (device_context == nullptr || (PyObject*)Py_TYPE(mode) != device_context) return true;
  }
  return false;
}

bool grad_enabled() { return c10::GradMode::is_enabled(); }

bool inference_tensor(PyObject* o) { return THPVariable_Check(o) && THPVariable_Unpack(o).is_inference(); }

bool inference_mode() { return c10::InferenceMode::is_enabled(); }

bool jit_tracing() { return torch::jit::tracer::isTracing(); }

// What torch._C._are_functorch_transforms_active answers, computed as torch's binding computes it:
// whether functorch's dynamic-layer keys are in this thread's included dispatch keys.
bool functorch_active() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

int num_threads() { return at::get_num_threads(); }

bool increment_version(PyObject* o) {
  try {
    if (!THPVariable_Check(o)) return false;
    const at::Tensor& t = THPVariable_Unpack(o);
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
    return true;
  } catch (...) {
    return false;
  }
}

bool g_direct_outputs = true;

namespace {
// Whether new tensors skip the dispatcher now: not while a profiler or another observer of
// torch's operators records (RecordFunction callbacks), which would miss their aten::empty*.
bool direct_outputs() { return g_direct_outputs && !at::hasCallbacks(); }
}  // namespace

PyObject* empty_like(PyObject* x, int64_t* ptr) {
  return guarded([&] {
    const at::Tensor& t = THPVariable_Unpack(x);
    if (direct_outputs() && t.is_non_overlapping_and_dense())
      return wrap(at::Tensor(at::detail::empty_strided_cpu(t.sizes(), t.strides(), t.scalar_type())), ptr);
    return wrap(at::empty_like(t), ptr);
  });
}

PyObject* empty(const int64_t* size, int ndim, int code, int64_t* ptr) {
  return guarded([&] {
    const c10::IntArrayRef sizes(size, ndim);
    if (direct_outputs()) return wrap(at::Tensor(at::detail::empty_cpu(sizes, type_of(code))), ptr);
    return wrap(at::empty(sizes, at::TensorOptions(type_of(code))), ptr);
  });
}

PyObject* adopt(void* block, int64_t bytes, void (*give)(void*, int64_t), const int64_t* size, const int64_t* stride,
                int ndim, int code) {
  bool handed = false;  // whether the tensor (and so the duty to give the block back) exists
  PyObject* out = guarded([&] {
    at::Tensor t = at::from_blob(
        block, c10::IntArrayRef(size, ndim), c10::IntArrayRef(stride, ndim),
        [give, bytes](void* p) { give(p, bytes); }, at::TensorOptions(type_of(code)));
    handed = true;
    return wrap(std::move(t), nullptr);
  });
  if (!handed) give(block, bytes);  // from_blob failed: the block goes back to the pool here
  return out;
}

}  // namespace bnlab_torch
