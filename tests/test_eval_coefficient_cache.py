"""Eval's kept coefficient rows (cpu_kernels_eval_cache.inc): reused only while a layer's running
statistics, affine parameters, eps and dtypes are, to the byte, those they were computed from.

The oracle is the same scenario run in a process with the cache off (BNLAB_EVAL_CACHE_BYTES=0):
every output of this process, where entries are made, reused, replaced and outgrown, must have its
bits, and so must the gradients of eval outputs with a graph (whose backward reads the kept mean
and invstd). The scenario changes the vectors in every way that bumps no version counter or keeps an
address (writes through ``.data``, a layer freed and another made in its memory, eps changed in
place), cycles more layers than the cache holds, and runs layers in two Python threads at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import bnlab
from bnlab.backends import cpu_build

pytestmark = pytest.mark.skipif(cpu_build.load() is None, reason="bnlab's CPU kernels did not build")

SCENARIO_SEED = 41


def _layer(c: int, seed: int, dtype=torch.float32, affine: bool = True, cls=bnlab.BatchNorm1d):
    gen = torch.Generator().manual_seed(seed)
    layer = cls(c, affine=affine).eval().to(dtype)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(c, generator=gen))
        layer.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        if affine:
            layer.weight.copy_(torch.randn(c, generator=gen))
            layer.bias.copy_(torch.randn(c, generator=gen))
    return layer


def scenario() -> list[torch.Tensor]:
    """The outputs of a fixed sequence of eval calls (torch.no_grad), in order, on two threads (its
    caller restores the count: keep_threads)."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(SCENARIO_SEED)
    out = []
    with torch.no_grad():
        # one layer called again and again, its vectors changed between calls without a version bump
        layer = _layer(100, 1)
        x = torch.randn(256, 100, generator=gen)
        out += [layer(x), layer(x)]
        for name in ("running_mean", "running_var", "weight", "bias"):
            for channel in (7, 99):  # the last too: a comparison of the vectors cut short misses it
                getattr(layer, name).data[channel] += 0.25  # .data: a write no version counter sees
                out += [layer(x), layer(x)]
        layer.eps = 1e-3
        out += [layer(x)]
        layer.running_var.data[3] = 0.0  # a zero variance: invstd from eps alone
        out += [layer(x)]
        # wide inputs of few values (the case the cache is for), NCHW and channels-last, bf16 too
        wide = _layer(2048, 2, cls=bnlab.BatchNorm2d)
        x4 = torch.randn(2, 2048, 3, 3, generator=gen)
        out += [wide(x4), wide(x4.to(memory_format=torch.channels_last)), wide(x4)]
        out += [wide.to(torch.bfloat16)(x4.to(torch.bfloat16))]
        wide.running_var.data[-1] += 0.25  # the last channel of 2-byte and 8-byte vectors
        out += [wide(x4.to(torch.bfloat16)), wide.to(torch.float64)(x4.double())]
        wide.bias.data[-1] += 0.25
        out += [wide(x4.double())]
        # a layer freed and another made, likely in the same memory, with other values
        for seed in range(3):
            fresh = _layer(64, 10 + seed)
            out += [fresh(torch.randn(8, 64, generator=gen))]
            del fresh
        # no affine parameters, then more layers than the cache's 256 entries, twice round
        out += [_layer(100, 3, affine=False)(x)]
        many = [_layer(16 + i % 7, 100 + i) for i in range(300)]
        inputs = [torch.randn(4, m.num_features, generator=gen) for m in many]
        for _ in range(2):
            out += [m(t) for m, t in zip(many, inputs)]
    # outputs with a graph (inference outside no_grad, frozen statistics while training): the mean
    # and invstd kept with the coefficients go to the backward
    frozen = _layer(512, 4)
    xg = torch.randn(64, 512, generator=gen, requires_grad=True)  # two threads, each its own coefficients
    for step in range(3):
        for _ in range(2):  # made, then reused
            y = frozen(xg)
            out += [y.detach(), *torch.autograd.grad(y.square().sum(), [xg, frozen.weight, frozen.bias])]
        frozen.running_var.data[step] += 0.5
    return out


def _run_threads() -> list[torch.Tensor]:
    """Two Python threads each calling their own layers (each thread has its own cache)."""
    layers = [_layer(512, 200 + i) for i in range(4)]
    xs = [torch.randn(2, 512, generator=torch.Generator().manual_seed(300 + i)) for i in range(4)]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def work(k: int) -> None:
        with torch.no_grad():
            for _ in range(50):
                for i in (2 * k, 2 * k + 1):
                    results[k].append(layers[i](xs[i]))

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results[0][:2] + results[1][:2] + results[0][-2:] + results[1][-2:]


def _outputs_with_the_cache_off(tmp_path) -> list[torch.Tensor]:
    path = tmp_path / "off.pt"
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]); import test_eval_coefficient_cache as t; "
        "torch.save((t.scenario(), t._run_threads()), sys.argv[1])"
    )
    env = {**os.environ, "BNLAB_EVAL_CACHE_BYTES": "0"}
    subprocess.run([sys.executable, "-c", code, str(path), os.path.dirname(__file__)], env=env, check=True)
    return torch.load(path)


def test_outputs_have_the_bits_of_the_calls_without_the_cache(tmp_path, keep_threads):
    assert os.environ.get("BNLAB_EVAL_CACHE_BYTES") != "0", "this process must keep coefficients"
    off, off_threads = _outputs_with_the_cache_off(tmp_path)
    on, on_threads = scenario(), _run_threads()
    assert len(on) == len(off) and len(on_threads) == len(off_threads)
    for i, (a, b) in enumerate(zip(on + on_threads, off + off_threads)):
        assert a.dtype == b.dtype and torch.equal(a, b), i


def test_each_change_of_a_vector_changes_the_output():
    """Not vacuous: every change the scenario makes does move the output (else a stale entry would
    go unseen)."""
    layer = _layer(100, 1)
    x = torch.randn(256, 100)
    with torch.no_grad():
        before = layer(x)
        for name in ("running_mean", "running_var", "weight", "bias"):
            getattr(layer, name).data[7] += 0.25
            after = layer(x)
            assert not torch.equal(after[:, 7], before[:, 7]), name
            before = after
        layer.eps = 1e-3
        assert not torch.equal(layer(x), before)


def test_a_negative_variance_written_after_a_kept_call_still_raises():
    layer = _layer(100, 1)
    x = torch.randn(256, 100)
    with torch.no_grad():
        layer(x), layer(x)  # kept, then reused
        layer.running_var.data[5] = -1.0
        with pytest.raises(ValueError, match="running_var"):
            layer(x)
        layer.running_var.data[5] = 1.0
        expected = torch.nn.functional.batch_norm(
            x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
        )
        assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-6)
