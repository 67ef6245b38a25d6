"""State dicts load both ways with torch.nn, old checkpoints load, and convert() keeps a model's state."""

from __future__ import annotations

import copy
import io
from collections import OrderedDict

import pytest
import torch
from torch import nn

import bnlab
from conftest import assert_close

PAIRS = [(bnlab.BatchNorm1d, nn.BatchNorm1d), (bnlab.BatchNorm2d, nn.BatchNorm2d), (bnlab.BatchNorm3d, nn.BatchNorm3d)]
CONFIGS = [
    dict(),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(momentum=None, bias=False),
]


def _trained(layer_type, config, shape, seed=0):
    """A layer whose parameters and buffers are no longer at their initial values."""
    torch.manual_seed(seed)
    layer = layer_type(shape[1], **config)
    if layer.affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2.0)
            if layer.bias is not None:
                layer.bias.normal_()
    for _ in range(3):
        layer(torch.randn(shape) * 2 + 1)
    return layer


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("config", CONFIGS)
def test_state_dicts_load_both_ways_strictly(ours, theirs, config):
    shape = {nn.BatchNorm1d: (5, 3), nn.BatchNorm2d: (4, 3, 2, 2), nn.BatchNorm3d: (2, 3, 2, 2, 2)}[theirs]
    for source_type, target_type in ((ours, theirs), (theirs, ours)):
        source = _trained(source_type, config, shape)
        target = target_type(3, **config)
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)  # through serialization, as a checkpoint would go
        buffer.seek(0)
        target.load_state_dict(torch.load(buffer), strict=True)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key
        x = torch.randn(shape)
        source.eval()
        target.eval()
        assert_close(target(x), source(x), 1e-6, f"{source_type.__name__} -> {target_type.__name__}")


def test_old_checkpoint_without_num_batches_tracked_loads():
    source = _trained(nn.BatchNorm2d, {}, (4, 3, 2, 2))
    old = OrderedDict((k, v) for k, v in source.state_dict().items() if k != "num_batches_tracked")
    old._metadata = OrderedDict({"": {"version": 1}})  # saved before torch added the buffer
    layer = bnlab.BatchNorm2d(3)
    layer.load_state_dict(old, strict=True)
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, source.running_mean)


def test_state_dict_version_metadata_matches_torch():
    assert bnlab.BatchNorm2d(3).state_dict()._metadata[""]["version"] == nn.BatchNorm2d(3).state_dict()._metadata[""]["version"]


def _model(bn2d=nn.BatchNorm2d, bn1d=nn.BatchNorm1d, bn3d=nn.BatchNorm3d):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        bn2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), bn2d(4, momentum=None)),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        bn1d(6, affine=False),
        nn.Unflatten(1, (6, 1, 1, 1)),
        bn3d(6, track_running_stats=False),
    )


def test_convert_keeps_state_and_outputs_and_shares_parameters():
    model = _model()
    for _ in range(2):
        model(torch.randn(8, 3, 5, 5))
    reference_model = copy.deepcopy(model)
    params_before = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model[1].eval()  # modes are per layer and must survive the swap
    reference_model[1].eval()

    converted = bnlab.convert(model)
    assert converted is model
    kinds = [type(m) for m in model.modules()]
    assert bnlab.BatchNorm2d in kinds and bnlab.BatchNorm1d in kinds and bnlab.BatchNorm3d in kinds
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params_before)), "parameters must be shared, not copied"
    assert model[1].training is False and model[3][1].training is True
    assert model[3][1].momentum is None and model[6].affine is False and model[8].track_running_stats is False

    x = torch.randn(8, 3, 5, 5)
    y, y_ref = model(x), reference_model(x)
    assert_close(y, y_ref, 1e-5, "converted model output")
    (y * torch.randn_like(y)).sum().backward()  # not y.sum(): its gradient through a final BN is 0
    optimizer.step()  # the optimizer built before conversion still updates the live parameters
    assert not torch.equal(model[0].weight, reference_model[0].weight)
    assert not torch.equal(model[1].weight, reference_model[1].weight)
    for key, value in reference_model.state_dict().items():
        assert model.state_dict()[key].shape == value.shape, key


def test_convert_back_to_torch_round_trip():
    model = _model(bnlab.BatchNorm2d, bnlab.BatchNorm1d, bnlab.BatchNorm3d)
    model(torch.randn(8, 3, 5, 5))
    state = copy.deepcopy(model.state_dict())
    back = bnlab.convert(model, to="torch")
    assert not any(isinstance(m, bnlab.modules.BNLAB_BATCHNORM_TYPES) for m in back.modules())
    for key, value in state.items():
        assert torch.equal(back.state_dict()[key], value), key
    again = bnlab.convert(back)
    assert sum(isinstance(m, bnlab.modules.BNLAB_BATCHNORM_TYPES) for m in again.modules()) == 4


def test_convert_names_the_layer_it_cannot_convert():
    # torch.nn takes eps=0; bnlab refuses it, and the error says which layer of the model it is
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.BatchNorm2d(4, eps=0.0)))
    with pytest.raises(ValueError, match=r"module: layer '1\.0', a torch\.nn\.BatchNorm2d, cannot become a "
                                         r"bnlab\.BatchNorm2d: eps: expected a finite float > 0"):
        bnlab.convert(model)
    assert type(model[1][0]) is nn.BatchNorm2d  # left as it was


def test_convert_a_single_layer_returns_its_replacement():
    layer = nn.BatchNorm1d(3)
    new = bnlab.convert(layer)
    assert type(new) is bnlab.BatchNorm1d and new.weight is layer.weight and new.running_var is layer.running_var


def test_convert_swaps_sync_batchnorm_both_ways_keeping_its_group_and_tensors():
    group = object()  # stands for a process group: only its identity is carried over
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.SyncBatchNorm(6, momentum=0.3, eps=1e-3, process_group=group))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
        model[1].bias.uniform_(-1, 1)
    reference = copy.deepcopy(model)
    tensors = [model[1].weight, model[1].bias, model[1].running_mean, model[1].running_var]
    bnlab.convert(model)
    layer = model[1]
    assert type(layer) is bnlab.SyncBatchNorm and layer.process_group is group
    assert (layer.momentum, layer.eps, layer.training) == (0.3, 1e-3, True)
    assert all(a is b for a, b in zip([layer.weight, layer.bias, layer.running_mean, layer.running_var], tensors))
    x = torch.randn(10, 4, dtype=torch.float32)
    # No process group exists here: both layers are local BN, in training and in eval.
    assert_close(model(x), reference(x), 2e-4, "training")
    assert_close(layer.running_var, reference[1].running_var, 1e-6, "running_var")
    model.eval()
    reference.eval()
    assert_close(model(x), reference(x), 2e-6, "eval")
    bnlab.convert(model, to="torch")
    assert type(model[1]) is nn.SyncBatchNorm and model[1].process_group is group and model[1].weight is tensors[0]


class _Siamese(nn.Module):
    """One BN layer held under two names, called on both branches (a siamese network's tied layer)."""

    def __init__(self, bn_type):
        super().__init__()
        self.bn = bn_type(3)
        self.other = self.bn

    def forward(self, a, b):
        return self.bn(a) + self.other(b)


@pytest.mark.parametrize("convert", ["to_bnlab", "to_torch", "sync"])
def test_a_layer_held_in_two_places_becomes_one_layer_held_in_both(convert):
    """named_children() gives a module held twice once: the second place kept the old layer,
    beside its replacement sharing its buffers, and recalibrate then wrote the statistics of one
    branch over the other's (the fiftieth session's audit: running_var 72.5 where 36.2)."""
    model = _Siamese(bnlab.BatchNorm1d if convert == "to_torch" else nn.BatchNorm1d)
    if convert == "sync":
        converted = bnlab.SyncBatchNorm.convert_sync_batchnorm(model)
        expected = bnlab.SyncBatchNorm
    else:
        converted = bnlab.convert(model, to="torch" if convert == "to_torch" else "bnlab")
        expected = nn.BatchNorm1d if convert == "to_torch" else bnlab.BatchNorm1d
    assert converted.bn is converted.other and type(converted.bn) is expected
    assert len({id(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}) == 1
    if convert == "to_bnlab":  # the statistics of both branches, as the unconverted model's
        gen = torch.Generator().manual_seed(0)
        batches = [(torch.randn(8, 3, generator=gen, dtype=torch.float64) * 6,
                    torch.randn(8, 3, generator=gen, dtype=torch.float64) + 4) for _ in range(3)]
        converted.double()
        bnlab.recalibrate(converted, batches, forward=lambda m, batch: m(*batch))
        values = torch.cat([torch.cat(batch) for batch in batches])
        assert_close(converted.bn.running_var, values.var(0), 1e-12, "running_var")
