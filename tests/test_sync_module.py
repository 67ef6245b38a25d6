"""bnlab.SyncBatchNorm in one process: the drop-in contract, the local fallback, conversion, state dicts.

The cross-process behaviour is tested with real process groups in tests/test_sync_distributed.py.
"""

from __future__ import annotations

import datetime
import inspect
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnlab
from bnlab.distributed import count_collectives, gather_moments, group_name, group_named
from bnlab.launch import _loopback_interface
from bnlab.stats import Moments, moments, update_running_stats_

LOCAL_FOR_RANK = {2: (bnlab.BatchNorm1d, nn.BatchNorm1d), 3: (bnlab.BatchNorm1d, nn.BatchNorm1d),
                  4: (bnlab.BatchNorm2d, nn.BatchNorm2d), 5: (bnlab.BatchNorm3d, nn.BatchNorm3d)}  # fmt: skip


def _randomize(layer: nn.Module, seed: int) -> nn.Module:
    """Non-default parameters and statistics, so that a lost or swapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in layer.state_dict().items():
            if name == "num_batches_tracked":
                tensor.fill_(int(torch.randint(1, 100, (1,), generator=g)))
            else:
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=g, dtype=torch.float64))
    return layer


def _max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def test_constructor_signature_is_torch_sync_batchnorms():
    ours = inspect.signature(bnlab.SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(nn.SyncBatchNorm.__init__).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]
    assert callable(bnlab.SyncBatchNorm.convert_sync_batchnorm)


def test_is_a_torch_batchnorm_but_not_a_torch_sync_batchnorm():
    layer = bnlab.SyncBatchNorm(3, process_group="a group")
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)  # weight-decay filters, freezing, fusion
    assert not isinstance(layer, nn.SyncBatchNorm)  # DDP on CPU rejects that class
    assert layer.process_group == "a group"


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_without_a_process_group_it_is_the_local_layer(rank):
    assert not dist.is_initialized()
    shape = (4, 3) + (2, 3, 2)[: rank - 2]
    bnlab_cls, torch_cls = LOCAL_FOR_RANK[rank]
    layers = [_randomize(cls(3, momentum=None, dtype=torch.float64), seed=1)
              for cls in (bnlab.SyncBatchNorm, bnlab_cls, torch_cls)]  # fmt: skip
    g = torch.Generator().manual_seed(rank)
    for step in range(3):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        outs = []
        for layer in layers:
            xi = x.clone().requires_grad_()
            with count_collectives() as calls:
                y = layer(xi)
                y.backward(dy)
            assert calls == {}
            outs.append((y.detach(), xi.grad, layer.weight.grad.clone(), layer.running_var.clone()))
            layer.zero_grad()
        for other in outs[1:]:
            for a, b in zip(outs[0], other):
                assert _max_diff(a, b) <= 1e-12
    for layer in layers:
        layer.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    assert _max_diff(layers[0](x), layers[2](x)) <= 1e-12


def test_any_rank_from_two_up_is_accepted_and_rank_one_is_not():
    layer = bnlab.SyncBatchNorm(2, dtype=torch.float64)
    x = torch.randn(3, 2, 1, 2, 1, 2, dtype=torch.float64)  # 6D: no BatchNorm*d takes it
    expected = bnlab.functional.batch_norm(x, None, None, layer.weight, layer.bias, training=True)
    assert _max_diff(layer(x), expected) <= 1e-12
    with pytest.raises(ValueError, match=r"input: expected a tensor of shape \(N, C, \*\) with rank >= 2"):
        layer(torch.randn(2))
    with pytest.raises(ValueError, match="input: expected 2 channels on dim 1"):
        layer(torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="input: expected a torch.Tensor"):
        layer([[1.0, 2.0]])
    with pytest.raises(ValueError, match="eps: expected a finite float > 0"):
        bnlab.SyncBatchNorm(2, eps=-1.0)


STATE_DICT_PEERS = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, bnlab.BatchNorm2d]


@pytest.mark.parametrize("affine, track", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("peer", STATE_DICT_PEERS, ids=lambda c: f"{c.__module__.split('.')[0]}.{c.__name__}")
def test_state_dicts_load_both_ways_strictly(peer, affine, track):
    ours = _randomize(bnlab.SyncBatchNorm(5, affine=affine, track_running_stats=track), seed=2)
    theirs = _randomize(peer(5, affine=affine, track_running_stats=track), seed=3)
    expected = {k: v.clone() for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.state_dict().keys() == expected.keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in expected.items())
    _randomize(ours, seed=4)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in ours.state_dict().items())


def _mixed_model() -> nn.Module:
    """torch.nn 1d and 3d BN, bnlab 2d BN and torch.nn.SyncBatchNorm, nested, in various settings."""
    torch.manual_seed(0)  # the same weights on every call
    inner = nn.Sequential(nn.Conv3d(3, 2, 1), nn.BatchNorm3d(2, affine=False, momentum=None))
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6, eps=1e-3), nn.Unflatten(1, (6, 1, 1)),  # (N, 6, 1, 1)
        nn.Conv2d(6, 3, 1), bnlab.BatchNorm2d(3, momentum=0.2), nn.SyncBatchNorm(3, track_running_stats=False),
        nn.Unflatten(1, (3, 1)), inner,  # (N, 3, 1, 1, 1) -> (N, 2, 1, 1, 1)
    ).double()  # fmt: skip
    for i, layer in enumerate(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        _randomize(layer, seed=10 + i)
    model[4].eval()
    model[1].qconfig = "kept"
    return model


def test_convert_sync_batchnorm_keeps_every_tensor_mode_and_setting():
    model = _mixed_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the conversion
    group = object()
    converted = bnlab.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert converted is model
    new_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(new_layers) == len(layers) == 4
    for old, new in zip(layers, new_layers):
        assert type(new) is bnlab.SyncBatchNorm and new.process_group is group
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert getattr(new, name) is getattr(old, name), name  # shared, not copied
        for name in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(new, name) == getattr(old, name), name
    assert new_layers[0].qconfig == "kept"
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert {id(p) for group_ in optimizer.param_groups for p in group_["params"]} == {id(p) for p in model.parameters()}


def test_convert_round_trip_keeps_state_and_outputs():
    original = _mixed_model()
    converted = bnlab.SyncBatchNorm.convert_sync_batchnorm(_mixed_model())
    back = _mixed_model()
    _randomize(back[1], seed=99)  # differs until the converted model's state is loaded
    back.load_state_dict(converted.state_dict(), strict=True)
    x = torch.randn(5, 4, dtype=torch.float64)
    for model in (original, converted, back):
        model.eval()
    assert _max_diff(converted(x), back(x)) <= 1e-12
    assert _max_diff(converted(x), original(x)) <= 1e-12
    for model in (original, converted):  # training steps without a process group: the local layers
        model.train()
        model(x).sum().backward()
    assert all(_max_diff(a, b) <= 1e-12 for a, b in zip(original.state_dict().values(), converted.state_dict().values()))


def test_convert_a_single_layer_returns_its_replacement_and_leaves_other_modules():
    bn = _randomize(nn.BatchNorm2d(3), seed=5)
    sync = bnlab.SyncBatchNorm.convert_sync_batchnorm(bn)
    assert type(sync) is bnlab.SyncBatchNorm and sync.weight is bn.weight
    linear = nn.Linear(2, 2)
    assert bnlab.SyncBatchNorm.convert_sync_batchnorm(linear) is linear
    with pytest.raises(ValueError, match="module: expected BN layers whose num_features is known"):
        bnlab.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.LazyBatchNorm1d()))
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module, got str"):
        bnlab.SyncBatchNorm.convert_sync_batchnorm("model")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", ["relu", None])
def test_convert_makes_batchnormact2d_a_sync_layer_with_its_relu_and_residual(activation, residual):
    # It had become a plain SyncBatchNorm: the ReLU gone, and a residual call a TypeError.
    fused = _randomize(bnlab.BatchNormAct2d(3, activation=activation, residual=residual, dtype=torch.float64), 6)
    twin = bnlab.BatchNormAct2d(3, activation=activation, residual=residual, dtype=torch.float64)
    twin.load_state_dict(fused.state_dict())
    sync = bnlab.SyncBatchNorm.convert_sync_batchnorm(fused)
    assert type(sync) is bnlab.SyncBatchNormAct2d and sync.weight is fused.weight
    assert (sync.activation, sync.residual) == (activation, residual)
    assert bnlab.SyncBatchNorm.convert_sync_batchnorm(sync).activation == activation  # converting again keeps it
    gen = torch.Generator().manual_seed(8)
    for training in (True, False):  # without a process group: the local layer's bits, then the add and ReLU
        sync.train(training)
        twin.train(training)
        x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 - 1
        res = torch.randn(x.shape, generator=gen, dtype=torch.float64) if residual else None
        args = (x, res) if residual else (x,)
        xs, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yt = sync(xs, *args[1:]), twin(xt, *args[1:])
        assert torch.equal(ys, yt) and (activation is None or ys.min() >= 0)
        ys.backward(torch.ones_like(ys))
        yt.backward(torch.ones_like(yt))
        assert torch.equal(xs.grad, xt.grad)
    assert all(torch.equal(a, b) for a, b in zip(sync.state_dict().values(), twin.state_dict().values()))
    assert sync.state_dict().keys() == nn.BatchNorm2d(3).state_dict().keys()


def test_sync_batchnormact2d_checks_its_arguments_and_input_by_name():
    with pytest.raises(ValueError, match="activation: expected 'relu' or None, got 'gelu'"):
        bnlab.SyncBatchNormAct2d(3, activation="gelu")
    layer = bnlab.SyncBatchNormAct2d(3, residual=True)
    x = torch.randn(4, 3, 2, 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match="residual: this layer was built with residual=True"):
        layer(x)
    with pytest.raises(ValueError, match=r"residual: expected a tensor like the input, \(4, 3, 2, 2\)"):
        layer(x, torch.randn(4, 3, 2, 1))
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())  # refused before BN ran
    with pytest.raises(ValueError, match=r"input: SyncBatchNormAct2d expected 4D \(N, C, H, W\) input, got 3D"):
        layer(torch.randn(4, 3, 2), torch.randn(4, 3, 2))


def test_convert_keeps_the_options_the_sync_layer_honours_and_warns_of_the_others():
    layer = bnlab.BatchNorm2d(3, accumulation_steps=3, skip_nonfinite=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped, nothing said
        sync = bnlab.SyncBatchNorm.convert_sync_batchnorm(layer)
    assert (sync.accumulation_steps, sync.skip_nonfinite) == (3, False)
    for options, named in (({"virtual_batch_size": 2}, "virtual_batch_size=2"), ({"renorm": True}, "renorm=True")):
        with pytest.warns(UserWarning, match=rf"convert_sync_batchnorm: BatchNorm2d\(3\) with {named} becomes "
                                             rf"bnlab.SyncBatchNorm, which has no such option"):
            bnlab.SyncBatchNorm.convert_sync_batchnorm(bnlab.BatchNorm2d(3, **options))


def test_running_stats_update_takes_a_tensor_momentum_like_a_float():
    x = torch.randn(7, 3, 2, dtype=torch.float64) + 4
    stats = moments(x)
    reference = [torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 1]
    want = [t.clone() for t in reference]
    update_running_stats_(*want, stats, 0.25)
    got = [t.clone() for t in reference]
    count = torch.tensor(float(stats.count), dtype=torch.float64)  # a merged, cross-rank count
    update_running_stats_(*got, Moments(count, stats.mean, stats.m2), torch.tensor(0.25, dtype=torch.float64))
    assert all(_max_diff(a, b) <= 1e-15 for a, b in zip(got, want))
    frozen = [t.clone() for t in reference]  # one value per channel: no unbiased variance, no update
    update_running_stats_(*frozen, Moments(torch.tensor(1.0, dtype=torch.float64), stats.mean, stats.m2), 0.25)
    assert all(torch.equal(a, b) for a, b in zip(frozen, reference))


@pytest.fixture
def world_of_one(tmp_path, monkeypatch):
    """A real gloo process group of one process (this one), torn down afterwards."""
    loopback = _loopback_interface()
    if loopback is not None:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", loopback)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_world_of_one_is_local_and_counting_sees_outer_calls_only(world_of_one):
    layer = bnlab.SyncBatchNorm(3, dtype=torch.float64)
    with count_collectives() as calls:
        layer(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    assert calls == {}  # a group of one issues nothing
    local = Moments(4, torch.arange(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    original = dist.all_gather
    with count_collectives() as calls:
        merged, counts = gather_moments(local)
        dist.all_gather_object([None], {"a": 1})  # torch implements it with all_gather: counted once
    assert calls == {"all_gather": 1, "all_gather_object": 1}
    assert dist.all_gather is original  # the wrappers are removed on exit
    assert float(merged.count) == 4 and torch.equal(merged.mean, local.mean) and torch.equal(merged.m2, local.m2)
    assert counts.tolist() == [4.0]


def test_group_names_round_trip_and_bad_groups_are_named(world_of_one):
    world = dist.distributed_c10d._get_default_group()
    assert group_named(group_name(None)) is world and group_named(group_name(world)) is world
    with pytest.raises(TypeError, match=r"process_group: expected a torch.distributed ProcessGroup or None, got str"):
        group_name("0")
    with pytest.raises(ValueError, match=r"name: expected the name of a process group of this process.*'nope'"):
        group_named("nope")


def test_the_default_group_has_no_name_before_init_process_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"process_group: None names the default group, but torch.distributed has no"):
        group_name(None)
