"""``bnlab.BatchNorm1d/2d/3d``: drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

Each class subclasses its torch.nn counterpart, so the constructor, the parameter and buffer
names, ``reset_parameters``, old-checkpoint migration and every ``isinstance(m, nn.BatchNorm2d)``
check in user code (weight-decay exclusion, freezing, fusion) behave exactly as before; the
forward and backward computation is bnlab's (bnlab.functional). The three classes differ only in
the input ranks they accept.

The layers also carry the features of docs/features.md (Ghost BN, Batch Renormalization,
masked BN, accumulated statistics, the non-finite guard) as constructor options; the math of
each lives in bnlab.variants, and this file only routes to it.

Math: docs/math.md. Conventions (momentum, variance estimators) and the one difference in form
from torch.nn (a permuted input's output keeps the input's strides): docs/conventions.md.
"""

from __future__ import annotations

import inspect
from typing import NoReturn

from torch import Tensor, nn

from bnlab import _checks
from bnlab._fastpath import LAYER_CALL, install_layer_call, module_forward
from bnlab.custom_ops import is_compiling, is_exporting
from bnlab.forward_handoff import find_forwards_after_input_check, mark_after_check
from bnlab.functional import batch_norm
from bnlab.fx_leaf import is_proxy, record_call
from bnlab.scripting import refuse_scripting
from bnlab.stats import Moments, count_and_update_
from bnlab.variants.accumulate import StatsAccumulator
from bnlab.variants.dispatch import batch_stats_forward
from bnlab.variants.masked import check_mask
from bnlab.variants.options import FEATURE_DEFAULTS, check_feature_options

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BNLAB_BATCHNORM_TYPES"]

# torch added the keyword-only ``bias`` argument to _NormBase in 2.x; older releases lack it.
_TORCH_HAS_BIAS_KWARG = "bias" in inspect.signature(nn.modules.batchnorm._NormBase.__init__).parameters
# and to the lazy layers' base (bnlab.lazy), asked separately: nothing ties the two in older releases.
_LAZY_HAS_BIAS_KWARG = "bias" in inspect.signature(nn.modules.batchnorm._LazyNormBase.__init__).parameters


def rank_check(check):
    """Mark ``check`` (a ``_check_input_dim``) as bnlab's own test of the input's rank, which the
    fast paths make themselves from ``_ranks``; any other a class defines is called as torch.nn calls
    it (:meth:`_BatchNormMixin.__init_subclass__`)."""
    check._bnlab_rank_check = True
    return check


class _BatchNormMixin:
    """Shared state checks and forward for bnlab's BatchNorm classes (put before the torch.nn base)."""

    #: input ranks accepted by the class, e.g. (2, 3) for BatchNorm1d.
    _ranks: tuple[int, ...] = ()
    #: the class has a _check_input_dim of its own (a user's subclass adding a condition), which
    #: the fast paths would not call: such a layer takes the general path (set by __init_subclass__)
    _own_input_check: bool = False
    #: built without num_features, on torch.nn's lazy base (bnlab.lazy).
    _lazy: bool = False

    # Feature options (docs/features.md), set per layer by __init__; these class-level values are the
    # defaults, so a layer unpickled from before the options existed behaves as torch.nn's.
    virtual_batch_size: int | None = FEATURE_DEFAULTS["virtual_batch_size"]
    renorm: bool = FEATURE_DEFAULTS["renorm"]
    rmax: float = FEATURE_DEFAULTS["rmax"]
    dmax: float = FEATURE_DEFAULTS["dmax"]
    renorm_ramp: tuple[int, int] | None = FEATURE_DEFAULTS["renorm_ramp"]
    accumulation_steps: int = FEATURE_DEFAULTS["accumulation_steps"]
    skip_nonfinite: bool = FEATURE_DEFAULTS["skip_nonfinite"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        virtual_batch_size: int | None = None,
        renorm: bool = False,
        rmax: float = 3.0,
        dmax: float = 5.0,
        renorm_ramp: tuple[int, int] | None = None,
        accumulation_steps: int = 1,
        skip_nonfinite: bool = True,
    ) -> None:
        # A lazy layer (bnlab.lazy) has no num_features yet, and torch.nn's lazy base takes none.
        sized = () if self._lazy else (_checks.check_num_features(num_features),)
        options = check_feature_options(
            virtual_batch_size=virtual_batch_size,
            renorm=renorm,
            rmax=rmax,
            dmax=dmax,
            renorm_ramp=renorm_ramp,
            accumulation_steps=accumulation_steps,
            skip_nonfinite=skip_nonfinite,
            track_running_stats=track_running_stats,
        )
        eps = _checks.check_eps(eps)
        momentum = _checks.check_momentum(momentum)
        if dtype is not None and dtype not in _checks.FLOATING_DTYPES:
            raise TypeError(f"dtype: expected a floating-point dtype for the parameters and statistics, got {dtype}")
        takes_bias = _LAZY_HAS_BIAS_KWARG if self._lazy else _TORCH_HAS_BIAS_KWARG
        kwargs = {"bias": bias} if takes_bias else {}
        super().__init__(*sized, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        if not takes_bias and affine and not bias:
            self.register_parameter("bias", None)
        # Plain attributes, not buffers: the state dict keeps torch.nn's keys (docs/features.md).
        for name, value in options.items():
            setattr(self, name, value)
        self._stats_accumulator = StatsAccumulator()  # pending micro-batches (accumulation_steps > 1)

    def __init_subclass__(cls, **kwargs) -> None:
        """A subclass overriding ``_check_input_dim`` (torch.nn's place for a subclass's own input
        condition) gets it called on every input, as torch.nn's forward calls it: the fast paths test
        only the rank, so this class's forward takes its general path for such a class, and that
        forward, where inherited, is put under another function, which the compiled layer call
        (taking only this class's forward) leaves to nn.Module.__call__. (A layer with a forward of
        its own that checks first, BatchNormAct2d's, keeps module_forward, and so its traced route.)
        Before, the override ran on no input a fast path took."""
        super().__init_subclass__(**kwargs)
        cls._own_input_check = not getattr(cls._check_input_dim, "_bnlab_rank_check", False)
        if cls._own_input_check and cls.forward is _BatchNormMixin.forward:
            cls.forward = _forward_with_own_input_check
        find_forwards_after_input_check(cls)

    @rank_check
    def _check_input_dim(self, input: Tensor) -> None:
        _checks.check_input_rank(input, self._ranks, type(self).__name__)

    def __prepare_scriptable__(self) -> NoReturn:
        """torch.jit.script's first question: answered with a TypeError saying what works (bnlab.scripting)."""
        refuse_scripting(self)

    def _check_channels(self, x: Tensor) -> None:
        _checks.check_input_channels(x, self.num_features)

    def _check_vectors(self, x: Tensor) -> None:
        """weight, bias and the running statistics: floating (C,) tensors on x's device (or None),
        as eval's batch_norm checks them; a training path's kernels had taken a weight on another
        device (a meta one: no memory) as no weight at all, and given BN without it."""
        for name in ("weight", "bias", "running_mean", "running_var"):
            _checks.check_channel_vector(getattr(self, name), name, self.num_features, x)

    def __call__(self, *args, **kwargs):
        """``layer(input)``: as nn.Module.__call__, which runs hooks and then :meth:`forward`.

        A call with one positional argument first tries the compiled layer call
        (``_fastpath.LAYER_CALL``, cpu_kernels_py_call.inc), which does the whole plain CPU case
        in one step, and declines, changing nothing, whenever nn.Module.__call__ would do anything
        but hand the input to this class's forward (hooks, tracing, a patched __call__, an
        overridden forward); where it would only call forward but no compiled call takes the
        input (a CUDA tensor, another backend chosen, a feature option), forward is called
        directly. The Python frames this saves run right after a kernel that streamed the caches
        (0.7-3.3 us a call: docs/benchmark_rounds.md, thirtieth session). Under torch.compile / export
        it is nn.Module.__call__ (checked first, so the tracer never reaches the compiled call).
        """
        if len(args) == 1 and not kwargs and not is_compiling():
            call = LAYER_CALL["call"]
            if call is not None:
                y = call(self, args[0])
                if y is not None:
                    # NotImplemented: nn.Module.__call__ would only call forward (no hook, no
                    # trace), which the compiled call does not take here (a CUDA tensor, an option)
                    return y if y is not NotImplemented else self.forward(args[0])
        return super().__call__(*args, **kwargs)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input`` (N, C, *) per channel; see the class docstring for the accepted ranks.

        ``mask`` (N, *spatial) bool, optional: only the positions where it is True enter the
        batch statistics (masked BN); every position is normalized. Ignored when the running
        statistics are used (evaluation mode).
        """
        if mask is None and not self._own_input_check:  # (a subclass's own check: the general path)
            y = module_forward(self, input)  # the common case, validated once (bnlab._fastpath)
            if y is not None:
                return y
        if is_proxy(input):  # torch.fx.symbolic_trace: one call_module node, as torch.nn's layers
            return record_call(self, (input,), {} if mask is None else {"mask": mask})
        x = _checks.check_input(input)
        self._check_input_dim(x)
        return self._forward_checked(x, mask)

    def _forward_after_input_check(self, x: Tensor) -> Tensor:
        """:meth:`forward` of a tensor ``x`` (N, C, *) that this layer's ``_check_input_dim`` has
        passed (see bnlab.forward_handoff). Takes the fast paths whatever the class's
        check: they do not call it."""
        y = module_forward(self, x)
        return y if y is not None else self._forward_checked(x, None)

    def _forward_checked(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """The general path of :meth:`forward`, from after ``_check_input_dim``: x (N, C, *), mask
        (N, *spatial) bool or None."""
        self._check_channels(x)
        if mask is not None:
            check_mask(mask, x)
        # Batch statistics in training, and in eval when there are no running statistics to use.
        if not self.training and not (self.running_mean is None and self.running_var is None):
            return batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        # Validate before any state moves, so a rejected batch changes nothing.
        _checks.check_training_batch(x)
        self._check_vectors(x)
        if self.training and self.track_running_stats:  # first, as torch.nn's num_batches_tracked.add_(1)
            _checks.check_buffers_updatable(self.running_mean, self.running_var, self.num_batches_tracked)
        y, stats = batch_stats_forward(self, x, mask)
        if self.training and self.track_running_stats and self.running_mean is not None:
            self._record_batch_stats(stats)
        return y

    # -- running statistics --------------------------------------------------------------------
    def _record_batch_stats(self, stats: Moments) -> None:
        """A training batch's statistics: into the running averages now, or after ``accumulation_steps``."""
        if self.accumulation_steps > 1:
            if is_exporting():
                # The micro-batches wait in Python between calls, which an exported program cannot
                # hold: tracing had left fake tensors in the eager layer's accumulator, and the
                # program never updated its running statistics.
                raise RuntimeError(
                    f"accumulation_steps: {type(self).__name__} with accumulation_steps={self.accumulation_steps} "
                    "keeps its pending micro-batches in Python between training calls, which an exported "
                    "program cannot; export the model in eval mode (model.eval()), or with accumulation_steps=1"
                )
            stats = self._accumulator().add(stats, self.accumulation_steps)
            if stats is None:
                return
        self._update_running_stats(stats)

    def __getstate__(self) -> dict:
        """torch.nn's state, less an accumulator with nothing pending (``accumulation_steps``), which
        :meth:`__setstate__` makes again: a layer saved whole (``torch.save(model)``) then loads under
        ``torch.load(weights_only=True)`` with its own class allowed, as torch.nn's layers do, where the
        accumulator's class had to be allowed too. (Pending micro-batches are kept, and need
        ``bnlab.variants.accumulate.StatsAccumulator`` and ``bnlab.stats.Moments`` allowed.)"""
        parent = getattr(super(), "__getstate__", None)  # absent on Python 3.10 with a torch without one
        state = parent() if parent is not None else self.__dict__
        accumulator = state.get("_stats_accumulator")
        if isinstance(accumulator, StatsAccumulator) and accumulator.pending is None and not accumulator.micro_batches:
            state = {name: value for name, value in state.items() if name != "_stats_accumulator"}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_stats_accumulator" not in self.__dict__:
            self.__dict__["_stats_accumulator"] = StatsAccumulator()

    def _accumulator(self) -> StatsAccumulator:
        # getattr, not self.__dict__.get: under torch.compile (2.13) a layer with no accumulator yet
        # that looked it up in __dict__ made a new one at every compiled call, so its running
        # averages never moved (tests/test_compile.py).
        accumulator = getattr(self, "_stats_accumulator", None)
        if accumulator is None:  # a layer unpickled from a bnlab that made it here, at first use
            accumulator = self.__dict__["_stats_accumulator"] = StatsAccumulator()
        return accumulator

    def _update_running_stats(self, stats: Moments) -> None:
        """One update of the running averages, counted in ``num_batches_tracked`` as torch.nn counts it
        (except a batch the non-finite guard skips: bnlab.stats.count_and_update_)."""
        count_and_update_(
            self.running_mean, self.running_var, self.num_batches_tracked, stats, self.momentum, self.skip_nonfinite
        )

    def flush_accumulated_stats(self) -> bool:
        """Update the running averages now with the micro-batches accumulated so far.

        For ``accumulation_steps > 1`` when a group ends early (the last, partial step of an
        epoch). Returns whether there was anything to apply.
        """
        stats = self._accumulator().pop()
        if stats is None or self.running_mean is None:
            return False
        self._update_running_stats(stats)
        return True

    def extra_repr(self) -> str:
        changed = [
            f"{name}={getattr(self, name)!r}"
            for name, default in FEATURE_DEFAULTS.items()
            if getattr(self, name) != default and (self.renorm or name not in ("rmax", "dmax", "renorm_ramp"))
        ]
        return ", ".join([super().extra_repr()] + changed)

    def reset_running_stats(self) -> None:
        """torch.nn's reset (running averages 0 and 1, the counter 0), which also drops the
        micro-batches ``accumulation_steps`` had collected: they belong to the statistics reset."""
        super().reset_running_stats()
        self._drop_pending_stats()

    def _drop_pending_stats(self) -> None:
        # __dict__: torch.nn's __init__ resets the statistics before this class makes its accumulator
        accumulator = self.__dict__.get("_stats_accumulator")
        if accumulator is not None:
            accumulator.pop()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # torch reports a shape mismatch in terms of tensors; say which layer size the checkpoint
        # had, in place of torch's message for that key (one message per key, not two), under
        # torch's own opening words, which loaders search for (Hugging Face's "size mismatch").
        reported = []
        for key in ("weight", "bias", "running_mean", "running_var"):
            value = state_dict.get(prefix + key)
            if isinstance(value, Tensor) and getattr(self, key, None) is not None and value.shape != (self.num_features,):
                what = ("the checkpoint was saved from a layer with a different number of channels" if value.dim() == 1
                        else "a BN layer holds one value per channel")  # fmt: skip
                error_msgs.append(
                    f"size mismatch for {prefix}{key}: expected shape ({self.num_features},) for {type(self).__name__}"
                    f"(num_features={self.num_features}), got {tuple(value.shape)}: {what}"
                )
                reported.append(f"size mismatch for {prefix}{key}:")
        before = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if reported:  # torch's own messages for those keys say the same in terms of tensors
            error_msgs[before:] = [m for m in error_msgs[before:] if not m.startswith(tuple(reported))]
        if any(prefix + key in state_dict for key in ("running_mean", "running_var", "num_batches_tracked")):
            self._drop_pending_stats()  # micro-batches collected before describe other statistics


def _forward_with_own_input_check(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
    """_BatchNormMixin.forward, for a class with its own ``_check_input_dim`` (see
    ``_BatchNormMixin.__init_subclass__``)."""
    return _BatchNormMixin.forward(self, input, mask)


# what BN's forwards do once the input has passed _check_input_dim (bnlab.forward_handoff)
mark_after_check(_BatchNormMixin.forward, _BatchNormMixin._forward_after_input_check)
mark_after_check(_forward_with_own_input_check, _BatchNormMixin._forward_after_input_check)


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """BN over a 2D (N, C) input (per feature, over the batch) or 3D (N, C, L) input (per channel, over N and L).

    Same arguments, parameters (weight, bias), buffers (running_mean, running_var,
    num_batches_tracked) and state dict as ``torch.nn.BatchNorm1d``.

    Args:
        num_features: C.
        eps: added to the variance before the square root (> 0).
        momentum: weight of the new batch in the running averages (0.1), or None for a cumulative average.
        affine: learn weight (γ, init 1) and bias (β, init 0).
        track_running_stats: keep running averages for eval mode; if False, eval uses batch statistics.
        device, dtype: of the parameters and buffers.
        bias: with affine, learn β as well (keyword only).

    Feature options (keyword only; defaults reproduce torch.nn; none adds a state-dict key;
    examples and papers in docs/features.md):
        virtual_batch_size: Ghost BN: in training, normalize consecutive sub-batches of this many samples.
        renorm: Batch Renormalization; rmax (>= 1), dmax (>= 0) clip r and d; renorm_ramp=(start, end)
            relaxes them linearly from (1, 0) over those training steps (counted by num_batches_tracked).
        accumulation_steps: merge this many training micro-batches' statistics and update the running
            averages once (gradient accumulation); ``flush_accumulated_stats()`` applies a partial group.
        skip_nonfinite: a batch with NaN/Inf statistics leaves the running averages and
            num_batches_tracked unchanged (decided per layer, on the device). On by default.

    ``forward(input, mask=None)``: a bool mask of shape (N, *spatial) restricts the batch statistics
    to the positions where it is True (masked BN).

    Shape: input (N, C) or (N, C, L); output the same.
    """

    _ranks = (2, 3)


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """BN over a 4D (N, C, H, W) input, per channel over N, H and W (seed 000's conv BN).

    Same arguments, parameters, buffers and state dict as ``torch.nn.BatchNorm2d``; see
    :class:`BatchNorm1d` for the arguments. Shape: input (N, C, H, W); output the same.
    channels_last inputs give channels_last outputs.
    """

    _ranks = (4,)


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """BN over a 5D (N, C, D, H, W) input, per channel over N, D, H and W.

    Same arguments, parameters, buffers and state dict as ``torch.nn.BatchNorm3d``; see
    :class:`BatchNorm1d` for the arguments. Shape: input (N, C, D, H, W); output the same.
    """

    _ranks = (5,)


BNLAB_BATCHNORM_TYPES = (BatchNorm1d, BatchNorm2d, BatchNorm3d)

install_layer_call(_BatchNormMixin.forward)
