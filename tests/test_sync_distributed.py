"""bnlab.SyncBatchNorm across real processes: gloo on loopback, compared with one process on the whole batch.

One 4-rank job (bnlab.launch.run_local_ranks, a file store, timeouts on the group, on every
collective and on the whole run) runs every case below on its process group and returns raw
tensors; the tests here compare them with bnlab.BatchNorm*d and torch.nn.BatchNorm*d (or the
functional forms for a 6D input) run in this process on the concatenated batch, in float64 to
1e-9. Spawning torch processes costs seconds, so all checks share that one job.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab import reference
from bnlab.launch import run_local_ranks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the ranks import sync_workers too
import sync_workers  # noqa: E402

WORLD = 4
GEN = torch.Generator().manual_seed(20240604)


def _batch(n, channels, tail, dtype, offset=0.0, spread=1.0):
    """Per-channel offsets and scales, so that a wrong merge of means or variances shows."""
    shape = (n, channels) + tail
    view = (1, channels) + (1,) * len(tail)
    shift = offset + spread * torch.linspace(-3, 3, channels, dtype=torch.float64).view(view)
    scale = spread * torch.linspace(0.5, 2.5, channels, dtype=torch.float64).view(view)
    x = torch.randn(shape, generator=GEN, dtype=torch.float64) * scale + shift
    return x.to(dtype), torch.randn(shape, generator=GEN, dtype=torch.float64).to(dtype)


def _case(name, ranks, sizes_per_step, channels, tail, *, dtype=torch.float64, affine=True, momentum=0.1,
          track=True, batches_tracked=0, eval_sizes=None, offset=0.0, spread=1.0):  # fmt: skip
    layer = dict(num_features=channels, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    init = {}
    if affine:
        init["weight"] = (1 + 0.3 * torch.randn(channels, generator=GEN, dtype=torch.float64)).to(dtype)
        init["bias"] = torch.randn(channels, generator=GEN, dtype=torch.float64).to(dtype)
    if track:
        init["running_mean"] = torch.randn(channels, generator=GEN, dtype=torch.float64).to(dtype)
        init["running_var"] = (0.5 + torch.rand(channels, generator=GEN, dtype=torch.float64)).to(dtype)
        init["num_batches_tracked"] = torch.tensor(batches_tracked)
    steps = []
    for sizes in sizes_per_step:
        x, dy = _batch(sum(sizes), channels, tail, dtype, offset, spread)
        steps.append({"sizes": sizes, "x": x, "dy": dy})
    case = {"name": name, "ranks": ranks, "layer": layer, "init": init, "steps": steps, "rank": 2 + len(tail)}
    if eval_sizes is not None:
        case["eval_sizes"] = eval_sizes
        case["eval_x"] = _batch(sum(eval_sizes), channels, tail, dtype)[0]
    return case


CASES = [
    _case("uneven_3_0_2", [0, 1, 2], [[3, 0, 2]] * 3, 3, (5,), eval_sizes=[2, 1, 3]),
    _case("one_each_1_1_1", [0, 1, 2], [[1, 1, 1]] * 3, 4, (), momentum=None, batches_tracked=2),
    _case("uneven_2_5_1_3", [0, 1, 2, 3], [[2, 5, 1, 3]] * 3, 3, (2, 3), momentum=0.3, eval_sizes=[1, 2, 3, 1]),
    _case("rank5_no_affine", [0, 1, 2, 3], [[1, 0, 2, 1], [0, 3, 0, 1]], 2, (2, 1, 3), affine=False),
    _case("rank6_no_running_stats", [0, 1, 2, 3], [[2, 5, 1, 3]] * 2, 2, (1, 2, 1, 2), track=False,
          eval_sizes=[2, 1, 2, 3]),  # fmt: skip
    _case("float32_2_5_1_3", [0, 1, 2, 3], [[2, 5, 1, 3]] * 2, 3, (4, 4), dtype=torch.float32),
    # docs: fp32 data at 1e3 ± 0.01 normalizes to within 2e-4 of float64 (torch.nn is off by ~1e-2).
    _case("float32_far_from_zero", [0, 1, 2], [[3, 0, 2]], 2, (6,), dtype=torch.float32, offset=1e3, spread=0.01),
    # dy = 8 + 0.01·noise: the ranks sum Σdy·x̂ about their own means with dy's common part off.
    _case("float32_dy_common_part", [0, 1, 2, 3], [[20, 0, 30, 14]], 3, (16, 16), dtype=torch.float32),
    _case("group_of_one", [3], [[4]] * 2, 3, (2, 2)),
    # Step 1 has one value per channel in the whole group; step 2 none at all; steps 0 and 3 are ordinary.
    _case("one_value_error", [0, 1, 2], [[2, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1]], 2, (1,)),
    # Step 1 holds a NaN on rank 2 only: the guard must skip that step on every rank alike.
    _case("nonfinite_skipped", [0, 1, 2], [[2, 3, 2]] * 3, 3, (2,), momentum=None, batches_tracked=1),
]
CASES[-1]["steps"][1]["x"][6, 1, 0] = float("nan")
_COMMON = next(c for c in CASES if c["name"] == "float32_dy_common_part")["steps"][0]
_COMMON["dy"] = 8 + 0.01 * _COMMON["dy"]
CASE_BY_NAME = {case["name"]: case for case in CASES}
SYNCED = [c["name"] for c in CASES if len(c["ranks"]) > 1]
# torch.nn's fp32 BN loses the digits this case checks; the float64 reference checks it instead.
# torch.nn has no non-finite guard: its running statistics turn NaN, so bnlab's one-process layer is the oracle.
# With dy's common part, a rank's float32 dweight holds a share far larger than the sum (its own
# test allows for that rounding against the float64 reference).
ORACLE_PAIRS = [(c["name"], lib) for c in CASES for lib in ("bnlab", "torch")
                if c["name"] != "float32_dy_common_part"
                and not (lib == "torch" and c["name"] in ("float32_far_from_zero", "nonfinite_skipped"))]  # fmt: skip


def _ddp_case():
    steps = []
    for sizes in ([2, 5, 1, 3], [3, 3, 2, 1], [1, 1, 1, 1]):
        x, _ = _batch(sum(sizes), 2, (3, 3), torch.float64)
        steps.append({"sizes": sizes, "x": x, "target": torch.randint(0, 5, (sum(sizes),), generator=GEN)})
    torch.manual_seed(7)
    init = sync_workers.build_model(nn.BatchNorm2d).state_dict()
    act_init = sync_workers.ResidualEnd().state_dict()
    return {"init": init, "act_init": act_init, "steps": steps, "lr": 0.1}


DDP_CASE = _ddp_case()


@pytest.fixture(scope="module")
def ranks_out():
    """Every rank's results of the one 4-rank job (3 minutes at most, each collective 60 s at most)."""
    return run_local_ranks(sync_workers.sync_checks, WORLD, (CASES, DDP_CASE), timeout_s=180, collective_timeout_s=60)


# -- the single-process oracles ----------------------------------------------------------------


class _FunctionalBN(nn.Module):
    """Training-mode BN of any rank through a functional form (for inputs no BatchNorm*d module accepts)."""

    def __init__(self, fn, channels, dtype):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.ones(channels, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(channels, dtype=dtype))

    def forward(self, x):
        return self.fn(x, None, None, self.weight, self.bias, True, 0.1, 1e-5)


def _oracle_layer(case, library):
    spec = case["layer"]
    if case["rank"] > 5:
        assert not spec["track_running_stats"] and spec["affine"], "the functional oracle covers this setting only"
        fn = bnlab.functional.batch_norm if library == "bnlab" else F.batch_norm
        return _FunctionalBN(fn, spec["num_features"], spec["dtype"])
    index = {2: 1, 3: 1, 4: 2, 5: 3}[case["rank"]]
    cls = getattr(bnlab if library == "bnlab" else nn, f"BatchNorm{index}d")
    return cls(**spec)


def _oracle(case, library):
    """The case's steps on one process with each step's whole batch."""
    layer = _oracle_layer(case, library)
    layer.load_state_dict(case["init"], strict=True)
    steps = []
    for step in case["steps"]:
        x = step["x"].clone().requires_grad_()
        before = sync_workers._state(layer)
        try:
            y = layer(x)
        except ValueError as error:
            layer.load_state_dict(before)  # torch.nn counts a batch before rejecting it; bnlab does not
            steps.append({"error": str(error)})
            continue
        y.backward(step["dy"])
        grads = {k: None if getattr(layer, k) is None else getattr(layer, k).grad.clone() for k in ("weight", "bias")}
        steps.append({"y": y.detach(), "dx": x.grad, "dw": grads["weight"], "db": grads["bias"],
                      "state": sync_workers._state(layer)})  # fmt: skip
        layer.zero_grad(set_to_none=True)
    out = {"steps": steps}
    if "eval_x" in case:
        layer.eval()
        with torch.no_grad():
            if case["layer"]["track_running_stats"]:
                out["eval_y"] = layer(case["eval_x"])
            else:  # eval without running statistics normalizes each rank's own batch, as torch does
                out["eval_y"] = torch.cat([layer(part) for part in torch.split(case["eval_x"], case["eval_sizes"])])
    return out


def _tol(case):
    return 1e-9 if case["layer"]["dtype"] == torch.float64 else 2e-5


def _close(actual, expected, tol, what):
    """max |actual - expected| / max(1, max |expected|) <= tol, in float64; NaN must sit where expected has NaN."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{what}: NaN in different places"
    actual, expected = actual[~nan], expected[~nan]
    if expected.numel() == 0:
        return
    err = (actual.double() - expected.double()).abs().max().item() / max(1.0, expected.double().abs().max().item())
    assert err <= tol, f"{what}: relative error {err:.3g} exceeds {tol:.1g}"


def _members(ranks_out, case):
    return [ranks_out[r][case["name"]] for r in case["ranks"]]


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, library", ORACLE_PAIRS)
def test_outputs_gradients_and_running_stats_equal_one_process(ranks_out, name, library):
    case = CASE_BY_NAME[name]
    members = _members(ranks_out, case)
    expected = _oracle(case, library)
    tol = _tol(case)
    for i, want in enumerate(expected["steps"]):
        got = [m["steps"][i] for m in members]
        what = f"{name} step {i} vs {library}"
        if "error" in want:
            assert all("error" in g for g in got), f"{what}: the one-process layer raised, some ranks did not"
            continue
        _close(torch.cat([g["y"] for g in got]), want["y"], tol, f"{what}: output")
        _close(torch.cat([g["dx"] for g in got]), want["dx"], tol, f"{what}: input gradient")
        for key in ("dw", "db"):
            if want[key] is None:
                assert all(g[key] is None for g in got), f"{what}: {key} should be None"
            else:  # DDP sums (averages) parameter gradients over ranks: the sum must be the global one
                _close(sum(g[key] for g in got), want[key], tol, f"{what}: summed {key}")
        for rank, g in zip(case["ranks"], got):
            assert g["state"].keys() == want["state"].keys(), f"{what}: state dict keys"
            for key, value in want["state"].items():
                _close(g["state"][key], value, tol, f"{what}: {key} on rank {rank}")
    if "eval_x" in case:
        _close(torch.cat([m["eval_y"] for m in members]), expected["eval_y"], tol, f"{name} eval vs {library}")


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_one_collective_in_forward_and_one_in_backward(ranks_out, name):
    case = CASE_BY_NAME[name]
    synced = name in SYNCED
    for rank, member in zip(case["ranks"], _members(ranks_out, case)):
        for i, step in enumerate(member["steps"]):
            if "error" in step:
                continue
            where = f"{name} step {i} rank {rank}"
            assert step["forward_collectives"] == ({"all_gather": 1} if synced else {}), where
            assert step["backward_collectives"] == ({"all_reduce": 1} if synced else {}), where
        if "eval_collectives" in member:
            assert member["eval_collectives"] == {}, f"{name} eval on rank {rank}: eval mode is local"


@pytest.mark.parametrize("name", SYNCED)
def test_synced_path_runs_the_selected_backends_primitives(ranks_out, name):
    case = CASE_BY_NAME[name]
    for rank, member in zip(case["ranks"], _members(ranks_out, case)):
        for i, step in enumerate(s for s in member["steps"] if "error" not in s):
            assert step["forward_primitives"] == {"moments": 1, "normalize": 1}, f"{name} step {i} rank {rank}"
            assert step["backward_primitives"] == {"grad_sums": 1, "grad_input": 1}, f"{name} step {i} rank {rank}"
        if "eval_primitives" in member:  # eval: the local layer, through the same backend
            assert member["eval_primitives"] == {"normalize": 1} if CASE_BY_NAME[name]["layer"]["track_running_stats"] \
                else {"moments": 1, "normalize": 1}, f"{name} eval on rank {rank}"


@pytest.mark.parametrize("name", SYNCED)
def test_synced_steps_read_no_tensor_value_on_the_host(ranks_out, name):
    """On CUDA every such read is a host synchronisation; the only allowed one is the rare
    one-value check, on a rank whose own batch has at most one value per channel."""
    case = CASE_BY_NAME[name]
    for rank, member in zip(case["ranks"], _members(ranks_out, case)):
        member_index = case["ranks"].index(rank)
        for i, (spec, step) in enumerate(zip(case["steps"], member["steps"])):
            if "error" in step:
                continue
            values_per_channel = spec["sizes"][member_index] * math.prod(spec["x"].shape[2:])
            reads = step["host_reads"]
            assert reads["backward"] == {}, f"{name} step {i} rank {rank}: {reads}"
            if values_per_channel > 1:
                assert reads["forward"] == {}, f"{name} step {i} rank {rank}: {reads}"
            else:
                assert reads["forward"] == {"tolist": 1}, f"{name} step {i} rank {rank}: {reads}"


def test_float32_far_from_zero_matches_the_float64_reference(ranks_out):
    case = CASE_BY_NAME["float32_far_from_zero"]
    step = case["steps"][0]
    got = [member["steps"][0] for member in _members(ranks_out, case)]
    w, b = case["init"]["weight"].double().numpy(), case["init"]["bias"].double().numpy()
    y, cache = reference.forward_train(step["x"].double().numpy(), w, b, eps=1e-5)
    dx, dw, db = reference.backward(step["dy"].double().numpy(), cache)
    _close(torch.cat([g["y"] for g in got]), torch.from_numpy(y), 2e-4, "output")
    # dx = γ·invstd·(...) with invstd ~ 100 here: compare relative to its own scale.
    dx_got, dx_want = torch.cat([g["dx"] for g in got]).double(), torch.from_numpy(dx)
    assert (dx_got - dx_want).abs().max() <= 2e-4 * dx_want.abs().max()
    _close(sum(g["dw"] for g in got), torch.from_numpy(dw), 2e-4, "summed dweight")
    _close(sum(g["db"] for g in got), torch.from_numpy(db), 2e-4, "summed dbias")


def test_float32_gradient_with_a_common_part_keeps_its_digits(ranks_out):
    """dy = 8 + 0.01·noise: each product dy·(x - mean) is ~800 times what survives Σdy·x̂. Summed
    whole about the group's mean (as before), this case's dx was off by 3.9e-6 of its size and the
    summed dweight by 27 times the float32 rounding of the ranks' shares; each rank now sums about
    its own mean with dy's common part off (bnlab.sync_steps.local_grad_sums): 1.4e-7 and 0.38."""
    case = CASE_BY_NAME["float32_dy_common_part"]
    step = case["steps"][0]
    got = [member["steps"][0] for member in _members(ranks_out, case)]
    w, b = case["init"]["weight"].double().numpy(), case["init"]["bias"].double().numpy()
    _, cache = reference.forward_train(step["x"].double().numpy(), w, b, eps=1e-5)
    dx, dw, _ = (torch.from_numpy(g) for g in reference.backward(step["dy"].double().numpy(), cache))
    dx_got = torch.cat([g["dx"] for g in got]).double()
    dx_error = float((dx_got - dx).abs().max() / dx.abs().max())
    assert dx_error < 1e-6, f"dx off by {dx_error:.2e} of its size"
    # Each rank's dweight is rounded to float32 before DDP would add them, and a rank's share
    # holds 8·m_r·(rank mean - group mean)·invstd, far larger than the sum: allow that rounding.
    shares = [g["dw"].double() for g in got]
    rounding = 2 ** -24 * sum(share.abs() for share in shares)
    dw_error = float(((sum(shares) - dw).abs() / (rounding + 1e-7 * dw.abs().max())).max())
    assert dw_error < 2, f"summed dweight off by {dw_error:.2f} times the rounding of the ranks' shares"


def test_one_value_per_channel_raises_the_same_error_on_every_rank(ranks_out):
    case = CASE_BY_NAME["one_value_error"]
    steps = [member["steps"][1] for member in _members(ranks_out, case)]
    messages = {step.get("error") for step in steps}
    assert len(messages) == 1 and None not in messages, f"every rank must raise, with one message: {messages}"
    message = messages.pop()
    assert message.startswith("input: expected more than 1 value per channel when training"), message
    assert "[0, 1, 0]" in message, message
    for step in steps:  # a rejected batch changes nothing, so the ranks stay in step with one another
        for key, value in step["state_before"].items():
            assert torch.equal(step["state_after"][key], value), key
    # The steps after the error (an empty global batch, then an ordinary one) ran on every rank:
    # the collectives stayed aligned. Their values are checked against the oracle above.
    assert all("y" in member["steps"][3] for member in _members(ranks_out, case))


def test_a_backward_with_create_graph_is_refused_on_every_rank(ranks_out):
    messages = [member["gradient_penalty"] for member in ranks_out]
    assert all(m is not None and m.startswith("SyncBatchNorm: a backward with create_graph=True") for m in messages), messages


def test_a_subclass_input_check_runs_once_per_synchronised_call(ranks_out):
    # SyncBatchNormAct2d's forward checks, then hands on to SyncBatchNorm's, which checked again
    assert [member["own_input_check"] for member in ranks_out] == [[1, 1]] * WORLD


def test_a_rank_outside_the_group_hears_of_the_channel_count_first(ranks_out):
    messages = [member["outsider_channels"] for member in ranks_out]
    assert messages[0] is None
    assert all(m.startswith("input: expected 3 channels on dim 1") for m in messages[1:]), messages


def _one_process_final_state(model: nn.Module, init: dict) -> dict:
    """The state of ``model`` trained as one process on each step's whole global batch: the DDP runs' oracle."""
    model.load_state_dict(init, strict=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=DDP_CASE["lr"], momentum=0.9)
    for step in DDP_CASE["steps"]:
        optimizer.zero_grad()
        F.cross_entropy(model(step["x"]), step["target"]).backward()
        optimizer.step()
    return model.state_dict()


def _check_ddp_ranks(ranks_out, run: str, want: dict, synced: str, local: str, collectives: dict) -> None:
    """Every rank of the DDP run ``run`` holds layers of type ``synced`` (none of ``local``), issued
    ``collectives`` at each step, and ended at ``want`` (1e-9)."""
    for rank in range(WORLD):
        got = ranks_out[rank][run]
        assert synced in got["types"] and local not in got["types"], got["types"]
        assert got["collectives"] == [collectives] * len(DDP_CASE["steps"]), rank
        assert got["state"].keys() == want.keys()
        for key, value in want.items():
            _close(got["state"][key], value, 1e-9, f"DDP rank {rank}: {key}")


@pytest.mark.parametrize("norm", [bnlab.BatchNorm2d, nn.BatchNorm2d], ids=["bnlab", "torch"])
def test_ddp_training_with_sync_bn_equals_one_process_on_the_global_batch(ranks_out, norm):
    want = _one_process_final_state(sync_workers.build_model(norm), DDP_CASE["init"])
    _check_ddp_ranks(ranks_out, "ddp", want, "SyncBatchNorm", "BatchNorm2d", {"all_gather": 2, "all_reduce": 2})
    for rank in range(WORLD):  # SyncBN's state loads into the model it came from
        sync_workers.build_model(norm).load_state_dict(ranks_out[rank]["ddp"]["state"], strict=True)


def test_ddp_training_with_a_converted_batchnormact2d_keeps_its_relu_and_residual(ranks_out):
    # convert_sync_batchnorm made BatchNormAct2d a plain SyncBatchNorm: the ReLU was gone and the
    # residual call a TypeError. Now a SyncBatchNormAct2d, trained as one process on the global batch.
    want = _one_process_final_state(sync_workers.ResidualEnd(), DDP_CASE["act_init"])
    _check_ddp_ranks(ranks_out, "ddp_act", want, "SyncBatchNormAct2d", "BatchNormAct2d",
                     {"all_gather": 1, "all_reduce": 1})
