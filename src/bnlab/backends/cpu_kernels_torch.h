// What the compiled calls read of tensors and how they make their outputs, through torch's C++ API:
// the declarations both sides of the module share (cpu_kernels_torch.cpp defines them; the
// Python glue of cpu_kernels.cpp calls them where BNLAB_TORCH_API is defined).
//
// Why: through the Python C API each fact of a tensor is a Python call (x.dtype, x.shape,
// x.stride(), x.is_cpu, x.data_ptr(): 30-110 ns each, with a tuple or an int made and freed, and
// torch's check for __torch_function__ in each), and an eval call reads five tensors; a new output
// through torch.empty_like is 1.2 us of argument parsing and dispatch. Read from the C++ tensor
// they are a few nanoseconds, and a new tensor ~0.5 us (docs/benchmark_rounds.md,
// thirty-ninth session). Only ints and pointers cross this boundary, so the rest of the module
// needs none of torch's headers and keeps C++17 and its compile time; this file alone is compiled
// against the installed torch (cpu_build: the "torch" build, which falls back to the plain
// extension module when torch's headers do not compile here).
#pragma once

#include <Python.h>

#include <cstdint>

namespace bnlab_torch {

constexpr int kMaxDims = 8;

// A dense tensor as the kernels see it. code: the dtype code (0 float32, 1 float64, 2 bfloat16,
// 3 float16; -1 another dtype); ptr: the address of its first element (0 when it has none, as off
// the CPU may be).
struct Facts {
  int code = -1;
  bool cpu = false;
  bool requires_grad = false;
  int ndim = 0;
  int64_t numel = 1;
  int64_t size[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};
  int64_t ptr = 0;
};

// Fills *f for o, a torch.Tensor (the caller has checked its exact type). False, with no Python
// error set, for a tensor the kernels must not read as plain memory: not strided, a negative or
// conjugate bit, no storage or a storage torch refuses to expose (wrapper tensors), more than
// kMaxDims dims.
bool read(PyObject* o, Facts* f);

// Whether a torch function mode or a torch dispatch mode is active (a user's
// TorchFunctionMode, FlopCounterMode, FakeTensorMode...; not torch.set_default_device's, which
// only fills in the device of factory functions called from Python): such modes expect to see the
// call's tensor operations, so the compiled calls leave it to the Python path.
bool modes_active();

// torch._C._get_tracing_state() is not None (torch.jit.trace records), and
// torch._C._are_functorch_transforms_active() (a torch.func transform's level is on), read here
// without the two pybind11 calls: a tiny eval's layer call 1.71-1.77 us against 1.84-1.85
// (fifty-first session, three processes each).
bool jit_tracing();
bool functorch_active();

// torch.is_grad_enabled() and torch.get_num_threads().
bool grad_enabled();
int num_threads();

// Whether o is a tensor made under torch.inference_mode() (x.is_inference()), and whether that mode
// is on now (torch.is_inference_mode_enabled()).
bool inference_tensor(PyObject* o);
bool inference_mode();

// torch.autograd.graph.increment_version(o) for a tensor o the kernels wrote through its data
// pointer (none for an inference tensor, which has no version counter). False, with nothing
// done, where o is not a tensor.
bool increment_version(PyObject* o);

// New CPU tensors, as new references with *ptr their data, or nullptr with a Python error set:
//   empty_like: torch.empty_like(x), x a tensor read() accepted;
//   empty: torch.empty(size, dtype=code), contiguous;
//   adopt: a tensor on memory the caller owns (a pooled block of `bytes`), which calls
//          give(block, bytes) when its storage dies, in whatever thread, without the GIL (and
//          at once when the tensor cannot be made).
// empty_like and empty make their tensors as torch's CPU kernels for those operators do
// (at::detail::empty_strided_cpu with x's strides, empty_cpu), without going through the
// dispatcher twice, which cost ~0.3 us of a 2 us eval layer call (benchmarks/layer_call_ab.py,
// fifty-second session). The compiled calls decline under every mode and transform that dispatch
// would have run, and their kernels write every value, so torch's filling of new memory under
// torch.use_deterministic_algorithms has nothing to show. While a profiler records (RecordFunction
// callbacks), both go through the dispatcher, so that the profile keeps their aten::empty_like /
// aten::empty events as torch.nn's calls do. An x that is not dense and non-overlapping takes
// at::empty_like (which for a dense x gives x's strides, as the direct way does).
PyObject* empty_like(PyObject* x, int64_t* ptr);
PyObject* empty(const int64_t* size, int ndim, int code, int64_t* ptr);
PyObject* adopt(void* block, int64_t bytes, void (*give)(void*, int64_t), const int64_t* size, const int64_t* stride,
                int ndim, int code);
// Whether empty_like and empty skip the dispatcher (true unless an A/B timing turns it off:
// bn_ab_switches, cpu_kernels_py_attrs.inc).
extern bool g_direct_outputs;

}  // namespace bnlab_torch
