"""bnlab's BatchNorm as torch operators, so that torch.compile and torch.export keep it whole.

Why: bnlab's kernels are C functions and Triton launches reading raw data pointers. TorchDynamo
cannot trace into them, so a ``torch.compile``'d model broke its graph at every bnlab BN layer
(with a warning per layer), ``fullgraph=True`` failed, and ``torch.export`` could not capture the
model. Defined in the ``bnlab`` namespace of the dispatcher (``torch.library``), each BN call is
one opaque node of the graph with a fake implementation (output shapes, strides and dtypes only)
and a registered backward. The compiled graph then stays whole around it, and the node runs the
eager kernels, so a compiled model computes the bits of the eager one.

Eager calls do not go through these operators: even a bare dispatcher call costs microseconds
that a small layer cannot spare. ``bnlab._fastpath``, ``bnlab.functional.batch_norm`` and
``BatchNormAct2d`` route a call here only while :func:`tracing`. (They are defined with
``torch.library.Library``, not the higher-level ``torch.library.custom_op``, whose Python
wrapper cost ~60 us more per call.)

The operators (x is (N, C, *); weight, bias and the running buffers are (C,); every ``stats`` is
float64, with rows mean, M2 = Σ(x - mean)², invstd = 1/sqrt(var + eps) in training and mean,
invstd in evaluation, so that the last row is invstd in both):

- ``bnlab::batch_norm_train(x, weight?, bias?, eps, running_mean?, running_var?,
  num_batches_tracked?, momentum?, skip_nonfinite) -> (y, stats, new_running_mean,
  new_running_var, new_num_batches_tracked)``: batch statistics, and the buffers' next values as
  the modules compute them (bnlab.stats.count_and_update_; ``momentum=None`` is the cumulative
  average), which :func:`train` copies into the buffers (0-element tensors where a buffer is
  None). Returning them, rather than writing them, keeps the operator functional: torch
  registers no autograd formula for an operator that mutates its inputs.
- ``bnlab::batch_norm_eval(x, running_mean, running_var, weight?, bias?, eps) -> (y, stats)``;
- their backwards, ``bnlab::batch_norm_train_backward`` and ``bnlab::batch_norm_eval_backward``
  ``(dy, x, weight?, stats, need_input, need_weight, bias_dtype?) -> (dx, dweight, dbias)``, with a
  0-element tensor in place of each gradient not wanted (an operator cannot return None).

A double backward (``create_graph=True``) is not supported through them; torch.compile does not
support it either.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from bnlab.autograd import eval_grads, eval_statistics, param_grads
from bnlab.backends import select_backend
from bnlab.custom_ops_export import register_eval_decomposition

__all__ = ["AVAILABLE", "OVERLOAD", "tracing", "train", "batch_moments", "evaluate"]

#: Whether this torch can define the operators (torch.library.register_fake/register_autograd:
#: torch >= 2.4). On an older torch, compiled models take the modules' general path and break
#: their graph at each layer.
AVAILABLE = hasattr(torch.library, "register_fake") and hasattr(torch.library, "register_autograd")

#: ``torch.compiler.is_compiling`` where this torch has it (else always False): whether dynamo is
#: tracing the caller. The layers' ``__call__`` asks it before taking the compiled layer call.
is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
#: ``torch.compiler.is_exporting`` where this torch has it (else always False): torch.export
#: tracing the caller, strict or not
is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", lambda: False)


#: The dispatch modes of tracing outside torch.compile: FakeTensorMode, make_fx's proxy mode,
#: AOTAutograd's functionalization (absent from a torch without the keys).
_TRACING_MODES = tuple(
    getattr(torch._C._TorchDispatchModeKey, name)
    for name in ("FAKE", "PROXY", "FUNCTIONAL")
    if hasattr(getattr(torch._C, "_TorchDispatchModeKey", None), name)
)


def tracing_mode_active() -> bool:
    """Whether a fake, proxy or functional dispatch mode is active (FakeTensorMode, make_fx, AOTAutograd
    called directly): their tensors have no memory for the kernels, and a kernel call would be missing
    from the graph they record (make_fx of the Python path recorded only the output's empty_like)."""
    if not _TRACING_MODES or not torch._C._len_torch_dispatch_stack():
        return False
    return any(torch._C._get_dispatch_mode(key) is not None for key in _TRACING_MODES)


def tracing(x: object = None) -> bool:
    """Whether torch.compile or torch.export is tracing the caller, or another tracer records it
    (:func:`tracing_mode_active`), or the input ``x`` is a FakeTensor used outside its mode, with
    these operators available: then the layers and ``functional.batch_norm`` call :func:`train`
    and :func:`evaluate`, which such tracers record as one node each (and whose fake
    implementations give fake tensors their outputs)."""
    return AVAILABLE and (is_compiling() or type(x) is FakeTensor or tracing_mode_active())


def _strided_as_fake(t: Tensor, x: Tensor) -> Tensor:
    """t, with the strides of ``torch.empty_like(x)``, which the fake implementations promise.

    bnlab's kernels write outputs in x's memory format, so this is t itself in every case but a
    layout they do not keep (then one copy): a compiled graph reads an operator's outputs with
    the strides of its fake implementation, and different real strides would be read wrongly."""
    want = torch.empty_like(x, device="meta").stride()
    return t if t.stride() == want else torch.empty_like(x).copy_(t)


def _none_as_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


def grad_outputs(dx, dw, db, x: Tensor):
    """A backward operator's (dx, dweight, dbias) as it returns them: dx with the strides its fake
    promises, a 0-element tensor for each gradient not computed (None)."""
    dx = _strided_as_fake(dx, x) if dx is not None else None
    return _none_as_empty(dx, x), _none_as_empty(dw, x), _none_as_empty(db, x)


def _grad_fakes(dy: Tensor, x: Tensor, weight, stats, need_input: bool, need_weight: bool, bias_dtype):
    """The gradients' shapes and dtypes, for the two backward operators' fake implementations."""
    c = x.shape[1]
    dx = torch.empty_like(x) if need_input else x.new_empty(0)
    dw = torch.empty_like(weight) if need_weight and weight is not None else x.new_empty(0)
    db = x.new_empty(c, dtype=bias_dtype) if bias_dtype is not None else x.new_empty(0)
    return dx, dw, db


#: The overload every operator is defined under, and so the name a compiled graph's code calls
#: (``torch.ops.bnlab.batch_norm_train.v3``). torch.compile's on-disk caches (inductor's FX graph
#: cache, AOTAutograd's) key a graph by that code and not by an operator's definition: a graph
#: compiled against an older schema, fake implementation, tag or backward would be loaded again
#: after bnlab changed them (a cache written before the flexible_layout tag kept the NCHW
#: conversions it was compiled with). Move it on with any such change, or with a change to what a
#: row of ``stats`` holds; tests/test_compile.py pins it to the schemas and tags.
#: (v1: the ``default`` overloads of the first version, 2026-12-03; v2: the flexible_layout tag;
#: v3: SyncBatchNorm's ``stats`` gains a fourth row, the rank's own mean, 2026-12-05.)
OVERLOAD = "v3"

_SCHEMAS = {
    "batch_norm_train": f"batch_norm_train.{OVERLOAD}(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? running_mean, "
    "Tensor? running_var, Tensor? num_batches_tracked, float? momentum, bool skip_nonfinite) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "batch_norm_eval": f"batch_norm_eval.{OVERLOAD}(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, "
    "Tensor? bias, float eps) -> (Tensor, Tensor)",
    "batch_norm_train_backward": f"batch_norm_train_backward.{OVERLOAD}(Tensor dy, Tensor x, Tensor? weight, Tensor stats, "
    "bool need_input, bool need_weight, ScalarType? bias_dtype) -> (Tensor, Tensor, Tensor)",
    "batch_norm_eval_backward": f"batch_norm_eval_backward.{OVERLOAD}(Tensor dy, Tensor x, Tensor? weight, Tensor stats, "
    "bool need_input, bool need_weight, ScalarType? bias_dtype) -> (Tensor, Tensor, Tensor)",
}


def _train_impl(x, weight, bias, eps, running_mean, running_var, num_batches_tracked, momentum, skip_nonfinite):
    with torch.no_grad():
        given = (running_mean, running_var, num_batches_tracked)
        mean, var, count = (t.clone() if t is not None else None for t in given)  # the next values, from these
        y, stats = select_backend(x).train_forward_stats(x, weight, bias, eps, mean, var, momentum, count, skip_nonfinite)
        return _strided_as_fake(y, x), stats, *(_none_as_empty(t, x) for t in (mean, var, count))


def _train_fake(x, weight, bias, eps, running_mean, running_var, num_batches_tracked, momentum, skip_nonfinite):
    buffers = [torch.empty_like(t) if t is not None else x.new_empty(0) for t in (running_mean, running_var, num_batches_tracked)]
    return torch.empty_like(x), x.new_empty((3, x.shape[1]), dtype=torch.float64), *buffers


def _train_backward_impl(dy, x, weight, stats, need_input, need_weight, bias_dtype):
    with torch.no_grad():
        count = x.numel() // x.shape[1]
        dx, sum_dy_xhat, sum_dy = select_backend(x).backward(dy, x, stats[0], stats[-1], weight, count, need_input,
                                                             batch_mean=True)  # fmt: skip
        dw, db = param_grads(sum_dy_xhat, sum_dy, weight, bias_dtype, need_weight, True)
        return grad_outputs(dx, dw, db, x)


def _eval_impl(x, running_mean, running_var, weight, bias, eps):
    with torch.no_grad():
        backend = select_backend(x)
        mean, invstd = eval_statistics(running_mean, running_var, eps, backend)  # raises for var < 0
        y = backend.normalize(x, mean, invstd, weight, bias)
        return _strided_as_fake(y, x), torch.stack((mean, invstd))


def _eval_fake(x, running_mean, running_var, weight, bias, eps):
    return torch.empty_like(x), x.new_empty((2, x.shape[1]), dtype=torch.float64)


def _eval_backward_impl(dy, x, weight, stats, need_input, need_weight, bias_dtype):
    with torch.no_grad():
        needs = (need_input, need_weight, bias_dtype is not None)
        dx, dw, db = eval_grads(dy, x, weight, stats[0], stats[-1], needs, bias_dtype, select_backend(x))
        return grad_outputs(dx, dw, db, x)


def call_backward(backward_op, ctx, dy: Tensor, operands: tuple, weight_at: int = 1, bias_at: int = 2):
    """What a registered backward returns, one gradient per forward input: x's at 0, the weight's
    and bias's at ``weight_at`` and ``bias_at``, None elsewhere and where not wanted.

    The backward operator is called as ``backward_op(dy, *operands, need_input, need_weight,
    bias_dtype)``, with operands = (x, weight, ...) and ``ctx.bias_dtype`` (None without a bias)
    set by the setup_context; the bias dtype is passed as None when dbias is not wanted."""
    weight = operands[1]
    needs = ctx.needs_input_grad
    need_w = needs[weight_at] and weight is not None
    need_b = needs[bias_at] and ctx.bias_dtype is not None
    dx, dw, db = backward_op(dy, *operands, needs[0], need_w, ctx.bias_dtype if need_b else None)
    grads = [None] * len(needs)  # one entry per forward input
    grads[0] = dx if needs[0] else None
    grads[weight_at] = dw if need_w else None
    grads[bias_at] = db if need_b else None
    return tuple(grads)


def _autograd_formula(backward_op, weight_at: int, bias_at: int):
    """(backward, setup_context) of a forward whose inputs hold weight and bias at these positions."""

    def setup_context(ctx, inputs, output):
        weight, bias = inputs[weight_at], inputs[bias_at]
        ctx.save_for_backward(inputs[0], weight, output[1])  # x, weight, stats
        ctx.bias_dtype = bias.dtype if bias is not None else None

    def backward(ctx, dy, *_unused):  # the statistics and buffers' gradients: none
        return call_backward(backward_op, ctx, dy, ctx.saved_tensors, weight_at, bias_at)  # x, weight, stats

    return backward, setup_context


def define_operators(library, schemas: dict, impls: dict) -> dict:
    """Defines each operator ``name`` of ``impls`` ({name: (implementation, fake)}) in ``library``
    with its schema from ``schemas``; returns {name: the OpOverload under OVERLOAD}."""
    for name, (impl, fake) in impls.items():
        # flexible_layout: the kernels take any memory format (channels_last too) and write outputs
        # in x's, so inductor hands x over as its own code laid it out. Without the tag it converted
        # its channels-last convolution outputs to NCHW for each BN call and back after it.
        library.define(schemas[name], tags=(torch.Tag.flexible_layout,))
        library.impl(f"{name}.{OVERLOAD}", impl, "CompositeExplicitAutograd")  # below autograd, on every device
        torch.library.register_fake(f"bnlab::{name}.{OVERLOAD}", fake, lib=library)
    return {name: getattr(getattr(torch.ops.bnlab, name), OVERLOAD) for name in impls}


def _register():
    """Defines the four operators in the ``bnlab`` namespace; returns (library, train op, eval op)."""
    library = torch.library.Library("bnlab", "DEF")  # kept alive by the caller: the definitions last as long
    impls = {
        "batch_norm_train": (_train_impl, _train_fake),
        "batch_norm_eval": (_eval_impl, _eval_fake),
        "batch_norm_train_backward": (_train_backward_impl, _grad_fakes),
        "batch_norm_eval_backward": (_eval_backward_impl, _grad_fakes),
    }
    op = define_operators(library, _SCHEMAS, impls)
    for forward, weight_at, bias_at in (("batch_norm_train", 1, 2), ("batch_norm_eval", 3, 4)):
        backward, setup_context = _autograd_formula(op[f"{forward}_backward"], weight_at, bias_at)
        torch.library.register_autograd(op[forward], backward, setup_context=setup_context, lib=library)
    return library, op["batch_norm_train"], op["batch_norm_eval"]


_LIBRARY, _train_op, _eval_op = _register() if AVAILABLE else (None, None, None)
if AVAILABLE:  # for torch.onnx.export and other lowerings to ATen (bnlab.custom_ops_export)
    register_eval_decomposition(_eval_op)


def train(x: Tensor, weight, bias, eps: float, running_mean, running_var, num_batches_tracked, momentum, skip_nonfinite):
    """Training-mode BN through ``bnlab::batch_norm_train``: y (x's shape, dtype and strides), with
    the running averages (and the counter, if given) updated in place. For validated arguments."""
    y, _, mean, var, count = _train_op(
        x, weight, bias, eps, running_mean, running_var, num_batches_tracked, momentum, skip_nonfinite
    )
    for buffer, value in ((running_mean, mean), (running_var, var), (num_batches_tracked, count)):
        if buffer is not None:
            buffer.copy_(value.detach())
    return y


def batch_moments(x: Tensor, weight, bias, eps: float):
    """Training-mode BN with no running averages through ``bnlab::batch_norm_train``, for the
    layers' variants (Ghost BN's ghost batches): (y, mean, M2), the statistics float64 (C,) rows
    (as bnlab.autograd.BatchNormTrainFunction returns them). For validated arguments."""
    y, stats, *_ = _train_op(x, weight, bias, eps, None, None, None, None, False)
    return y, stats[0], stats[1]


def evaluate(x: Tensor, running_mean: Tensor, running_var: Tensor, weight, bias, eps: float) -> Tensor:
    """Eval-mode BN through ``bnlab::batch_norm_eval``: y (x's shape, dtype and strides). For
    validated arguments; raises for a negative running variance, naming the channels."""
    return _eval_op(x, running_mean, running_var, weight, bias, eps)[0]
