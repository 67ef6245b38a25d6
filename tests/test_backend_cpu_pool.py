"""The pool of reused output buffers for large CPU tensors (cpu_kernels_pool.inc, cpu_pool.py).

Outputs of POOL_MIN_BYTES or more come from blocks that earlier outputs gave back: the results
must be torch.nn's whatever the block held before, the tensors must behave as torch's own (shape,
strides, dtype, copying, saving, sharing), and the pool must stay within its limit, empty on
request, and survive tensors freed on other threads and in a forked child. The pool is global
to the process, so every check reads counters before and after rather than absolute values.
"""

from __future__ import annotations

import copy
import io
import multiprocessing
import threading
from pathlib import Path

import pytest
import torch

import bnlab
from bnlab.backends import cpu_build, cpu_pool
from conftest import TOLERANCE, assert_close

pytestmark = pytest.mark.skipif(
    cpu_build.load() is None or not hasattr(cpu_build.load(), "bn_empty"),
    reason="the pool lives in the compiled extension module, which did not build here",
)

# (16, 64, 8, 16) float32 is exactly POOL_MIN_BYTES: the smallest pooled output.
SHAPE = (16, 64, 8, 16)


@pytest.fixture(autouse=True)
def _pool_enabled():
    """Each test starts with the pool on and its default-sized limit restored after."""
    limit = cpu_pool.cpu_cache_info()["limit"]
    cpu_pool.set_cpu_cache_limit(max(limit, 1 << 30))
    yield
    cpu_pool.set_cpu_cache_limit(max(limit, 1 << 30))


def _pair(channels: int):
    torch.manual_seed(0)
    ours, theirs = bnlab.BatchNorm2d(channels), torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _eval_call(x):
    """A pooled output as the compiled eval call makes it (in the torch build through
    cpu_kernels_torch.cpp's adopt, else through DLPack as cpu_pool.empty_like)."""
    layer = bnlab.BatchNorm2d(x.shape[1]).eval()
    with torch.no_grad():
        return layer(x)


#: The two ways a pooled output is made, each with what it must hold: (make(x), its expected values).
MAKERS = {
    "cpu_pool.empty_like": (lambda x: cpu_pool.empty_like(x).copy_(x), lambda x: x),
    "the compiled eval call": (_eval_call, lambda x: _eval_call(x).clone()),
}


def _train_step(layer, x, dy):
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.backward(dy)
    return y, xg.grad


def test_threshold_is_exactly_the_smallest_pooled_shape():
    assert torch.zeros(SHAPE).numel() * 4 == cpu_pool.POOL_MIN_BYTES


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_outputs_match_torch_even_over_stale_blocks(memory_format, dtype):
    shape = SHAPE if dtype == torch.float32 else (16, 64, 16, 16)  # 512 KiB in bf16 too
    ours, theirs = _pair(shape[1])
    x = (torch.randn(shape) * 3 + 1).to(dtype=dtype, memory_format=memory_format)
    dy = torch.randn(shape).to(dtype=dtype, memory_format=memory_format)
    # Leave NaN-filled blocks of the right size in the pool: any element a kernel failed to write
    # would show as NaN below.
    poisoned = [cpu_pool.empty_like(x).fill_(float("nan")) for _ in range(3)]
    del poisoned
    before = cpu_pool.cpu_cache_info()
    y, dx = _train_step(ours, x, dy)
    y_ref, dx_ref = _train_step(theirs, x, dy)
    after = cpu_pool.cpu_cache_info()
    assert after["hits"] - before["hits"] >= 2, "forward output and input gradient both reuse idle blocks"
    tol = TOLERANCE[dtype]
    assert y.stride() == y_ref.stride() and dx.stride() == dx_ref.stride()
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, y_ref, tol, "forward")
    assert_close(dx, dx_ref, tol, "input gradient")
    ours.eval(), theirs.eval()
    with torch.no_grad():
        cpu_pool.empty_like(x).fill_(float("nan"))  # one more stale block, freed at once
        assert_close(ours(x), theirs(x), tol, "eval")


def test_a_freed_output_is_reused_last_in_first_out():
    layer = bnlab.BatchNorm2d(SHAPE[1])
    x = torch.randn(SHAPE)
    first = layer(x)
    address = first.data_ptr()
    del first
    before = cpu_pool.cpu_cache_info()
    second = layer(x)
    after = cpu_pool.cpu_cache_info()
    assert second.data_ptr() == address
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]


@pytest.mark.parametrize(
    ("shape", "block"),
    [((16, 64, 8, 16), 512 << 10), ((16, 64, 8, 17), 576 << 10), ((16, 64, 32, 32), 4 << 20), ((17, 64, 32, 32), 6 << 20)],
)
def test_blocks_round_to_64_kib_below_2_mib_and_to_huge_pages_above(shape, block):
    bnlab.empty_cpu_cache()
    y = cpu_pool.empty_like(torch.empty(shape))
    del y
    info = cpu_pool.cpu_cache_info()
    assert (info["idle_blocks"], info["idle_bytes"]) == (1, block)


def test_small_outputs_come_from_torch():
    before = cpu_pool.cpu_cache_info()
    x = torch.randn(SHAPE[0] - 1, *SHAPE[1:])
    y = bnlab.BatchNorm2d(SHAPE[1])(x)
    after = cpu_pool.cpu_cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    assert y.untyped_storage().resizable()


@pytest.mark.parametrize("maker", list(MAKERS))
def test_pooled_tensors_copy_save_and_share_like_torch_tensors(maker):
    make, expected_of = MAKERS[maker]
    x = torch.randn(SHAPE)
    expected = expected_of(x)
    before = cpu_pool.cpu_cache_info()
    y = make(x)
    after = cpu_pool.cpu_cache_info()
    assert (after["hits"] + after["misses"]) == (before["hits"] + before["misses"]) + 1  # a pooled block
    assert not y.untyped_storage().resizable()  # the one documented difference: see docs
    assert torch.equal(copy.deepcopy(y), expected)
    buffer = io.BytesIO()
    torch.save(y, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), expected)
    assert torch.equal(torch.from_numpy(y.numpy()), expected)
    y.share_memory_()
    assert y.is_shared() and torch.equal(y, expected)
    with pytest.raises(RuntimeError, match="not resizable"):
        make(x).resize_(2 * SHAPE[0], *SHAPE[1:])


def test_limit_bounds_idle_bytes_and_zero_turns_the_pool_off():
    x = torch.randn(SHAPE)
    cpu_pool.set_cpu_cache_limit(1 << 20)  # room for two 512 KiB blocks
    outs = [cpu_pool.empty_like(x) for _ in range(4)]
    del outs
    info = cpu_pool.cpu_cache_info()
    assert info["limit"] == 1 << 20
    assert info["idle_bytes"] <= 1 << 20 and info["idle_blocks"] == 2
    cpu_pool.set_cpu_cache_limit(0)
    assert cpu_pool.cpu_cache_info()["idle_bytes"] == 0
    y = bnlab.BatchNorm2d(SHAPE[1])(x)
    assert y.untyped_storage().resizable(), "with the pool off outputs are torch's own"
    y.detach().resize_(2 * SHAPE[0], *SHAPE[1:])


def test_empty_cpu_cache_releases_idle_blocks_only():
    x = torch.randn(SHAPE)
    kept = cpu_pool.empty_like(x).fill_(1.0)
    freed = cpu_pool.empty_like(x)
    del freed
    assert cpu_pool.cpu_cache_info()["idle_blocks"] >= 1
    bnlab.empty_cpu_cache()
    assert cpu_pool.cpu_cache_info()["idle_bytes"] == 0
    assert bool((kept == 1.0).all()), "a tensor in use keeps its memory"


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_limit_errors_name_the_argument(bad):
    with pytest.raises(ValueError, match="nbytes: expected a non-negative int"):
        bnlab.set_cpu_cache_limit(bad)


@pytest.mark.parametrize("maker", list(MAKERS))
def test_outputs_made_and_freed_on_many_threads(maker):
    make, expected_of = MAKERS[maker]
    x = torch.randn(SHAPE)
    expected = expected_of(x)
    before = cpu_pool.cpu_cache_info()
    errors = []

    def work():
        try:
            for _ in range(20):
                y = make(x)
                if not torch.equal(y, expected):
                    errors.append("a block was handed to two tensors at once")
                y.fill_(float("nan"))  # what a block next holds is written over before it is read
                del y
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = cpu_pool.cpu_cache_info()
    assert not errors
    served = (after["hits"] - before["hits"]) + (after["misses"] - before["misses"])
    assert served == 80
    assert after["idle_blocks"] <= before["idle_blocks"] + 4  # at most one block per thread was ever in use


def _child_step(queue):
    # One thread, as torch's DataLoader workers run: GNU OpenMP cannot start a team in a child
    # forked after its parent used one (torch.nn's own BatchNorm2d hangs there too).
    torch.set_num_threads(1)
    x = torch.randn(SHAPE)
    y = bnlab.BatchNorm2d(SHAPE[1])(x)
    queue.put(float((y.mean(dim=(0, 2, 3))).abs().max()))


def test_a_forked_child_uses_the_pool():
    bnlab.BatchNorm2d(SHAPE[1])(torch.randn(SHAPE))  # the parent's pool holds a block
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_step, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0
    assert queue.get(timeout=5) < 1e-5  # the child's output is normalized (per-channel mean 0)


def _resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    or "[madvise]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
    reason="measures what the huge-page hint makes resident, which only madvise mode follows",
)
def test_a_pooled_output_holds_about_its_own_size_resident():
    # 2 MiB + 256 bytes, in a block of 4 MiB: the hint had covered the whole block, and the write
    # past its first 2 MiB made the second huge page resident (3.5-4 MiB per live output, where
    # torch.nn's outputs held 2.0)
    cpu_pool.empty_cpu_cache()
    x = torch.randn(8193, 64)
    layer = bnlab.BatchNorm1d(64).eval()
    kept = []
    misses = cpu_pool.cpu_cache_info()["misses"]  # a running count for the process
    with torch.no_grad():
        before = _resident_mib()
        for _ in range(8):
            kept.append(layer(x))
        grown = _resident_mib() - before
    assert cpu_pool.cpu_cache_info()["misses"] - misses >= 8  # fresh blocks, not idle ones already resident
    expected = 8 * (x.numel() * 4 / 2**20)
    assert grown <= expected + 3, f"8 live outputs of 2 MiB + 256 bytes made {grown:.1f} MiB resident"
