"""Outputs written around the caches (non-temporal stores: st_lanes_stream, st16_stream).

The kernels stream float32 outputs of at least half the last-level cache (counted up to 32 MiB)
whose rows are whole 64-byte lines (16-bit ones of training passes too, in AVX-512 builds, by the
rule below the first test); BNLAB_STREAM_MIN_BYTES=0 makes every such output stream, so
small tensors reach that code here. Each case runs in a fresh process (the threshold is read once
per process) and compares with torch.nn, forward, backward and eval, on the NCL per-channel path
(rows of 1280 values), the waves path (few channels, rows of 1600), and rows of odd length, which
do not stream and take the flat walk instead. The same bound marks tensors too large for the cache,
whose statistics request row segments (rows of 2048 values or more) a page ahead
(add_shifted_f32): rows of 2304 values by channel, and of 2500 values (which do not stream) in
waves, reach that. 64 channels of 256-value rows stream from the channel-group walk
(cpu_kernels_ncl_groups.inc).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, torch, bnlab
    torch.manual_seed(0)
    shape = tuple(int(v) for v in sys.argv[1].split(","))
    ours, theirs = bnlab.BatchNorm2d(shape[1]), torch.nn.BatchNorm2d(shape[1])
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5); ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(shape) * 3 + 1
    dy = torch.randn(shape)
    def rel(a, b):
        return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
    for layer in (ours, theirs):
        layer.x = x.clone().requires_grad_()
        layer.y = layer(layer.x)
        layer.y.backward(dy)
    errs = [rel(ours.y, theirs.y), rel(ours.x.grad, theirs.x.grad), rel(ours.weight.grad, theirs.weight.grad) / 100]
    ours.eval(); theirs.eval()
    with torch.no_grad():
        errs.append(rel(ours(x), theirs(x)))
    print(max(errs))
    """
)


@pytest.mark.parametrize("shape", ["4,16,32,40", "8,3,40,40", "3,5,37,41", "4,16,48,48", "2,3,50,50", "2,64,16,16"])
def test_streamed_outputs_match_torch(shape):
    env = dict(os.environ, BNLAB_STREAM_MIN_BYTES="0", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", SCRIPT, shape], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) <= 2e-4


# Channels-last and (N, C) inputs: float32 rows of a multiple of 16 channels are written around the
# caches from the same bound (cpu_kernels_nlc_choices.inc's nlc_streams) in the eval pass and the training
# forward, and from two thirds of it (nlc_streams_dx) in the training backward's input gradient,
# the eval-mode (frozen) backward and bn_grad_input. The same arithmetic as the ordinary stores,
# so the same bits: digests of every output and gradient under BNLAB_STREAM_MIN_BYTES=0 must equal
# those at the default bound, where these small tensors do not stream. Both runs set
# BNLAB_NLC_GROUP_MAX_BYTES=0, so that the frozen backward takes its one pass over the rows
# (nlc_eval_backward) rather than the normalize kernel. 40 channels (not a multiple of 16) never
# stream, and must agree as well.
# NCL inputs of 16-bit values (AVX-512 builds, st16_stream; AVX2 builds never stream them) stream
# in the training forward, the backward's input gradient, the frozen backward and bn_grad_input,
# from two thirds of the bound, where rows are whole lines (multiples of 32 values) and either
# hold 2048 values or more or the tensor is beyond the flat walk's bound; float32 ones in the
# backward passes from there too (streams_dx), where rows hold 2048 values or more, and every
# float32 output from the bound itself (BNLAB_NCL_FLAT_MAX_BYTES=0 in both runs here, so that the shorter
# rows stream too): per channel (rows of 1280; of 2304, whose frozen backward is one pass; of
# 4160, in chunks that start off the 64-byte lines), in waves (3 channels), in channel groups (rows
# of 256); 37x41 maps never stream.
DIGEST_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys, torch, bnlab
    from bnlab.backends import get_backend
    cpu = get_backend("cpu")
    torch.set_num_threads(2)
    digest = hashlib.sha256()
    cases = {
        "nlc": [((4, 32, 6, 7), True), ((3, 64, 5, 5), True), ((300, 48), False), ((2, 40, 9, 9), True),
                ((64, 64, 10, 10), True)],  # 1.6 MB: beyond the L2, eval's pass is nlc_normalize's
        "ncl": [((4, 16, 32, 40), False), ((8, 3, 40, 40), False), ((2, 64, 16, 16), False), ((3, 5, 37, 41), False),
                  ((2, 8, 48, 48), False), ((1, 8, 4160), False)],
    }[sys.argv[1]]
    dtypes = [torch.float32] if sys.argv[1] == "nlc" else [torch.float32, torch.bfloat16, torch.float16]
    for dtype in dtypes:
        for shape, cl in cases:
            gen = torch.Generator().manual_seed(sum(shape))
            x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
            dy = torch.randn(shape, generator=gen).to(dtype)
            if cl:
                x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
            layer = (bnlab.BatchNorm2d if len(shape) == 4 else bnlab.BatchNorm1d)(shape[1])
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5, generator=gen); layer.bias.normal_(generator=gen)
            for mode in ("train", "eval"):
                layer.train(mode == "train")
                xg = x.clone().requires_grad_()
                y = layer(xg)
                y.backward(dy)
                for t in (y, xg.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var):
                    digest.update(t.detach().float().contiguous().numpy().tobytes())
                layer.weight.grad = layer.bias.grad = None
            with torch.no_grad():
                digest.update(layer(x).float().contiguous().numpy().tobytes())
            # the input gradient from given sums (bn_grad_input: SyncBatchNorm's backward)
            c = shape[1]
            stats = torch.randn(4, c, generator=gen, dtype=torch.float64)
            invstd = stats[1].abs() + 0.5
            dx = cpu.grad_input(dy, x, stats[0], invstd, layer.weight.detach(), stats[2], stats[3], x.numel() // c)
            digest.update(dx.float().contiguous().numpy().tobytes())
    print(digest.hexdigest())
    """
)


@pytest.mark.parametrize("inputs", ["nlc", "ncl"])
def test_streamed_outputs_are_the_ordinary_stores_bits(inputs):
    def digest(bound: str | None) -> str:
        walks = {"ncl": {"BNLAB_NCL_FLAT_MAX_BYTES": "0"}, "nlc": {"BNLAB_NLC_GROUP_MAX_BYTES": "0"}}[inputs]
        env = dict(os.environ, OMP_NUM_THREADS="2", **walks)
        env.pop("BNLAB_STREAM_MIN_BYTES", None)
        if bound is not None:
            env["BNLAB_STREAM_MIN_BYTES"] = bound
        out = subprocess.run(
            [sys.executable, "-c", DIGEST_SCRIPT, inputs], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert digest("0") == digest(None)


# bf16 input gradients written around the caches round as torch's float32 -> bfloat16 conversion,
# NaN, infinities, subnormals and overflow included (as test_backend_cpu.py's
# test_bfloat16_outputs_round_as_torch, whose small tensors do not stream): the streamed pairs of
# vectors (st32) and, for a pair holding a special value, their per-vector fallback. The input
# gradient with zero sums is dx = dy·(1 + 2^-10), exact in float32. Rows of 2048 and 4160 values
# stream under BNLAB_STREAM_MIN_BYTES=0: on one thread (a second thread would take the
# own-coefficients walk, which does not stream, for tensors within the L2), and on two threads
# for a tensor beyond the L2; rows of 4160 values start off the 64-byte lines at odd rows.
ROUNDING_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from bnlab.backends import get_backend
    sys.path.insert(0, sys.argv[2])
    from speed_helpers import assert_bf16_is_scaled_as_torch, bf16_special_values
    cpu = get_backend("cpu")
    shape = tuple(int(v) for v in sys.argv[1].split(","))
    dy = bf16_special_values(shape, seed=3)
    c = shape[1]
    scale = 1.0 + 2.0**-10
    zeros = torch.zeros(c, dtype=torch.float64)
    invstd = torch.full((c,), scale, dtype=torch.float64)
    dx = cpu.grad_input(dy, torch.ones_like(dy), zeros, invstd, None, zeros, zeros, dy.numel() // c)
    assert_bf16_is_scaled_as_torch(dx, dy, scale)
    print("rounded as torch")
    """
)


@pytest.mark.parametrize("shape,threads", [("3,2,2048", "1"), ("1,3,4160", "1"), ("2,64,4160", "2")])
def test_streamed_bf16_input_gradient_rounds_as_torch(shape, threads):
    env = dict(os.environ, BNLAB_STREAM_MIN_BYTES="0", OMP_NUM_THREADS=threads)
    out = subprocess.run(
        [sys.executable, "-c", ROUNDING_SCRIPT, shape, os.path.dirname(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "rounded as torch"
