"""Forward-mode AD and torch.func transforms through bnlab's BatchNorm (bnlab.composite).

Oracle: torch.nn.BatchNorm under the same transform, on the same state. Before bnlab.composite,
forward-mode AD raised NotImplementedError with gradients on, and under torch.no_grad an eval
layer silently returned no tangent; torch.func transforms raised.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import bnlab
from bnlab.composite import transforms_active
from conftest import TOLERANCE, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func
TOL = TOLERANCE[torch.float32]
PAIRS = {1: (torch.nn.BatchNorm1d, bnlab.BatchNorm1d), 2: (torch.nn.BatchNorm2d, bnlab.BatchNorm2d)}


def _pair(rank: int, channels: int, training: bool, track: bool = True, seed: int = 0):
    """(torch.nn layer, bnlab layer) with the same random state."""
    torch.manual_seed(seed)
    ref, ours = (cls(channels, track_running_stats=track) for cls in PAIRS[rank])
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
        if track:
            ref.running_mean.normal_()
            ref.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(ref.state_dict())
    return ref.train(training), ours.train(training)


def _input(rank: int, channels: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (6, channels) if rank == 1 else (4, channels, 3, 5)
    return torch.randn(shape, generator=gen)


def _jvp(layer, x, t, no_grad: bool):
    with torch.set_grad_enabled(not no_grad), fwAD.dual_level():
        out = fwAD.unpack_dual(layer(fwAD.make_dual(x, t)))
        assert transforms_active()
    return out.primal, out.tangent


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("no_grad", [False, True])
def test_forward_mode_ad_gives_torch_nn_tangents(rank, training, no_grad):
    ref, ours = _pair(rank, 3, training)
    x, t = _input(rank, 3), _input(rank, 3, seed=2)
    y_ref, tan_ref = _jvp(ref, x, t, no_grad)
    y, tan = _jvp(ours, x, t, no_grad)
    assert tan is not None, "a tangent must come back (it was silently dropped under no_grad before)"
    assert rel_err(y, y_ref) <= TOL and rel_err(tan, tan_ref) <= TOL
    if training:  # the running averages moved as torch.nn's did, counter included
        assert rel_err(ours.running_mean, ref.running_mean) <= TOL
        assert rel_err(ours.running_var, ref.running_var) <= TOL
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    assert not transforms_active()


@pytest.mark.parametrize("training", [False, True])
def test_func_jvp_of_the_functional_form(training):
    x, t = _input(2, 3), _input(2, 3, seed=2)
    w, b = torch.randn(3), torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5

    def f(impl):
        return lambda inp, weight: impl(inp, None if training else rm.clone(), None if training else rv.clone(),
                                        weight, b, training, 0.1, 1e-5)  # fmt: skip

    ref = torch.func.jvp(f(torch.nn.functional.batch_norm), (x, w), (t, torch.ones(3)))
    ours = torch.func.jvp(f(bnlab.functional.batch_norm), (x, w), (t, torch.ones(3)))
    assert rel_err(ours[0], ref[0]) <= TOL and rel_err(ours[1], ref[1]) <= TOL


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_func_grad_matches_torch_nn(rank, training):
    ref, ours = _pair(rank, 3, training, track=not training)  # torch.nn, too, refuses in-place buffers under grad
    x = _input(rank, 3)

    def grad_of(layer):
        return torch.func.grad(lambda inp: (layer(inp) ** 2 * torch.arange(inp.numel()).view_as(inp)).sum())(x)

    assert rel_err(grad_of(ours), grad_of(ref)) <= TOL


def test_func_grad_with_respect_to_the_parameters():
    ref, ours = _pair(2, 3, training=True, track=False)
    x = _input(2, 3)

    def grads(layer):
        params = dict(layer.named_parameters())
        loss = lambda p: (torch.func.functional_call(layer, p, (x,)) ** 3).sum()  # noqa: E731
        return torch.func.grad(loss)(params)

    g_ref, g = grads(ref), grads(ours)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert rel_err(g[name], g_ref[name]) <= TOL, name


@pytest.mark.parametrize("training", [False, True])
def test_vmap_matches_torch_nn(training):
    ref, ours = _pair(2, 3, training, track=not training)
    xs = torch.randn(5, 4, 3, 2, 2)  # five independent batches
    with torch.no_grad():
        expected = torch.vmap(ref)(xs)
        got = torch.vmap(ours)(xs)
    assert rel_err(got, expected) <= TOL


def _ensemble(lib, members: int = 4):
    """A vmap over ``members`` eval-mode BatchNorm1d(3) of different running statistics
    (torch.func.stack_module_state): a function of (params, buffers, x)."""
    torch.manual_seed(7)
    layers = [lib.BatchNorm1d(3).eval() for _ in range(members)]
    with torch.no_grad():
        for layer in layers:
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.normal_()
    params, buffers = torch.func.stack_module_state(layers)
    base = copy.deepcopy(layers[0]).to("meta")
    call = torch.func.vmap(lambda p, b, x: torch.func.functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))
    return call, params, buffers


def test_vmap_over_an_ensemble_of_eval_layers_matches_torch_nn():
    """The running-variance check read a vmapped buffer in a Python `if`: vmap raised (data-dependent
    control flow) where torch.nn computes."""
    x = torch.randn(6, 3)
    call_ref, params_ref, buffers_ref = _ensemble(torch.nn)
    call, params, buffers = _ensemble(bnlab)
    expected = call_ref(params_ref, buffers_ref, x)
    assert expected.shape == (4, 6, 3)
    assert rel_err(call(params, buffers, x), expected) <= TOL
    buffers["running_var"][2, 1] = -1.0  # one member's corrupted variance is still refused, by channel
    with pytest.raises(ValueError, match=r"running_var: expected non-negative .* at channels \[1\]"):
        call(params, buffers, x)
    # the members along dim 1 of the stacked buffers: still the channel named, not the member
    base = copy.deepcopy(bnlab.BatchNorm1d(3).eval()).to("meta")
    buffer_dims = {name: 1 if t.dim() == 2 else 0 for name, t in buffers.items()}  # (the counter: (members,))
    across = torch.func.vmap(lambda p, b, x: torch.func.functional_call(base, (p, b), (x,)),
                             in_dims=(dict.fromkeys(params, 1), buffer_dims, None))
    moved = {name: t.movedim(0, 1) if t.dim() == 2 else t for name, t in buffers.items()}
    with pytest.raises(ValueError, match=r"running_var: expected non-negative .* at channels \[1\]"):
        across({k: v.movedim(0, 1) for k, v in params.items()}, moved, x)


def test_jacrev_matches_torch_nn():
    ref, ours = _pair(1, 2, training=True, track=False)
    x = _input(1, 2)
    assert rel_err(torch.func.jacrev(ours)(x), torch.func.jacrev(ref)(x)) <= TOL


def test_in_place_running_averages_under_a_transform_fail_as_in_torch_nn():
    # torch.nn cannot update its running averages from inside torch.func.grad either; the same
    # call fails the same way here rather than silently computing something else.
    x = _input(1, 3)
    for layer in _pair(1, 3, training=True):
        with pytest.raises(RuntimeError, match="in-place"):
            torch.func.grad(lambda inp, layer=layer: layer(inp).sum())(x)


def test_outside_transforms_the_kernels_still_run(monkeypatch):
    calls = []
    import bnlab.composite as composite

    monkeypatch.setattr(composite, "train_forward", lambda *a: calls.append(a))
    monkeypatch.setattr(composite, "eval_forward", lambda *a: calls.append(a))
    ref, ours = _pair(2, 3, training=True)
    x = _input(2, 3)
    ours(x).sum().backward()
    with torch.no_grad():
        ours.eval()(x)
        bnlab.functional.batch_norm(x, None, None, training=True)
    assert calls == [] and not transforms_active()


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_bn_relu_under_forward_mode_ad(training, residual):
    ref, _ = _pair(2, 3, training)
    ours = bnlab.BatchNormAct2d(3, residual=residual)
    ours.load_state_dict(ref.state_dict())
    ours.train(training)
    x, t = _input(2, 3), _input(2, 3, seed=2)
    res, res_t = (_input(2, 3, seed=3), _input(2, 3, seed=4)) if residual else (None, None)

    def torch_sequence(inp, r):
        z = ref(inp)
        return torch.relu(z + r if r is not None else z)

    with fwAD.dual_level():
        dual_res = fwAD.make_dual(res, res_t) if residual else None
        expected = fwAD.unpack_dual(torch_sequence(fwAD.make_dual(x, t), dual_res))
        got = fwAD.unpack_dual(ours(fwAD.make_dual(x, t), dual_res))
    assert rel_err(got.primal, expected.primal) <= TOL and rel_err(got.tangent, expected.tangent) <= TOL
    if training:
        assert rel_err(ours.running_var, ref.running_var) <= TOL
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 1


@pytest.mark.parametrize("layer", [bnlab.BatchNormAct2d, bnlab.SyncBatchNormAct2d])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_bn_relu_under_vmap_matches_torch_nn(layer, training, residual):
    """In eval, vmap had raised: the in-place ReLU's check compared data pointers, which vmap's
    batched tensors do not have (the check now asks for a transform first)."""
    ref, _ = _pair(2, 3, training, track=not training)
    ours = layer(3, track_running_stats=not training, residual=residual)
    ours.load_state_dict(ref.state_dict())
    ours.train(training)
    xs = torch.randn(5, 4, 3, 2, 2)  # five independent batches
    rs = torch.randn(5, 4, 3, 2, 2) if residual else None

    def torch_sequence(x, r=None):
        z = ref(x)
        return torch.relu(z + r if r is not None else z)

    args = (xs, rs) if residual else (xs,)
    with torch.no_grad():
        expected = torch.vmap(torch_sequence)(*args)
        got = torch.vmap(ours)(*args)
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("variant", ["renorm", "masked", "ghost"])
def test_variant_tangents_match_their_reverse_mode_jacobian(variant):
    """No torch.nn counterpart: the oracle is the same layer outside any transform (its
    hand-derived backward, tested against the float64 references elsewhere), as a Jacobian."""
    torch.manual_seed(0)
    options = {"renorm": dict(renorm=True, rmax=1.2, dmax=0.3), "ghost": dict(virtual_batch_size=3), "masked": {}}
    layer = bnlab.BatchNorm1d(3, **options[variant]).double()
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
        layer.weight.normal_()
        layer.bias.normal_()
    x, t = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(6, 3, 4, dtype=torch.float64)
    kwargs = {"mask": torch.rand(6, 4, generator=torch.Generator().manual_seed(5)) > 0.3} if variant == "masked" else {}
    dual_layer, plain_layer, jac_layer = (copy.deepcopy(layer) for _ in range(3))
    with fwAD.dual_level():
        out = fwAD.unpack_dual(dual_layer(fwAD.make_dual(x, t), **kwargs))
    expected = plain_layer(x, **kwargs)
    jac = torch.autograd.functional.jacobian(lambda inp: jac_layer(inp, **kwargs), x).reshape(x.numel(), x.numel())
    f64 = TOLERANCE[torch.float64]
    assert rel_err(out.primal, expected) <= f64
    assert rel_err(out.tangent, (jac @ t.reshape(-1)).reshape(x.shape)) <= f64
    assert rel_err(dual_layer.running_var, plain_layer.running_var) <= f64
    assert int(dual_layer.num_batches_tracked) == int(plain_layer.num_batches_tracked) == 1


@pytest.mark.parametrize("make", [lambda lib: lib.BatchNorm2d(3), lambda lib: bnlab.BatchNormAct2d(3)],
                         ids=["BatchNorm2d", "BatchNormAct2d"])  # fmt: skip
def test_vmap_of_a_training_layer_with_unbatched_running_statistics_says_so(make):
    """torch.nn's layers answer this call with an error about the running statistics not being
    batched; bnlab's had answered with vmap's generic message about in-place arithmetic. Now the
    error names the buffers and the ways out (one of which is checked), and nothing has moved."""
    xs = torch.randn(5, 4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="running_mean or running_var.*were not batched"):
        torch.vmap(torch.nn.BatchNorm2d(3))(xs)  # the oracle's wording, for the record
    layer = make(bnlab)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="^running_mean, running_var: a training call under torch.func.vmap"):
        torch.vmap(layer)(xs)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    torch.func.replace_all_batch_norm_modules_(layer)  # the way out the message names first
    ref = torch.nn.BatchNorm2d(3, track_running_stats=False)
    expected = torch.vmap(ref)(xs)
    got = torch.vmap(layer)(xs)
    assert rel_err(got, torch.relu(expected) if isinstance(layer, bnlab.BatchNormAct2d) else expected) <= TOL


def test_vmap_over_an_ensemble_of_training_layers_updates_each_members_statistics_as_torch_nn():
    def ensemble(lib):
        torch.manual_seed(3)
        layers = [lib.BatchNorm1d(3) for _ in range(4)]
        params, buffers = torch.func.stack_module_state(layers)
        base = copy.deepcopy(layers[0]).to("meta")
        return torch.func.vmap(lambda p, b, x: torch.func.functional_call(base, (p, b), (x,))), params, buffers

    xs = torch.randn(4, 6, 3)
    (call_ref, p_ref, b_ref), (call, p, b) = ensemble(torch.nn), ensemble(bnlab)
    assert rel_err(call(p, b, xs), call_ref(p_ref, b_ref, xs)) <= TOL
    for name in ("running_mean", "running_var"):
        assert rel_err(b[name], b_ref[name]) <= TOL
    assert b["num_batches_tracked"].tolist() == b_ref["num_batches_tracked"].tolist() == [1, 1, 1, 1]
