"""The feature options leave the drop-in contract intact: defaults are torch.nn, state dicts are torch.nn's."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

import bnlab
from features_util import assert_close, assert_train_steps_match

PAIRS = [
    (bnlab.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3, 5)),
    (bnlab.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 5)),
    (bnlab.BatchNorm3d, torch.nn.BatchNorm3d, (3, 3, 2, 3, 4)),
]

OPTIONS = dict(virtual_batch_size=2, renorm=True, rmax=2.0, dmax=1.0, renorm_ramp=(1, 5), accumulation_steps=2, skip_nonfinite=False)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("ours_cls, theirs_cls, shape", PAIRS)
def test_defaults_reproduce_torch_nn(ours_cls, theirs_cls, shape, momentum):
    torch.manual_seed(0)
    ours, theirs = ours_cls(3, momentum=momentum), theirs_cls(3, momentum=momentum)
    assert_train_steps_match(ours, theirs, [(torch.randn(shape) * 2 + step, torch.randn(shape)) for step in range(3)])
    ours.eval()
    theirs.eval()
    x = torch.randn(shape)
    assert_close(ours(x), theirs(x), 2e-6, "eval")


@pytest.mark.parametrize("options", [{}, dict(virtual_batch_size=2), dict(accumulation_steps=2), dict(renorm=True)],
                         ids=["plain", "ghost", "accumulation", "renorm"])  # fmt: skip
def test_no_momentum_and_no_batch_counter_leave_the_averages_as_torch_nn_does(options):
    """momentum=None with num_batches_tracked set to None: torch.nn's factor is then 0 (no update).
    The general path, which every option takes, divided by the missing counter before."""
    torch.manual_seed(0)
    ours, theirs = bnlab.BatchNorm2d(3, momentum=None, **options), torch.nn.BatchNorm2d(3, momentum=None)
    ours.num_batches_tracked = theirs.num_batches_tracked = None
    for _ in range(2):
        x = torch.randn(4, 3, 3, 3) * 2 + 1
        ours(x)
        theirs(x)
    assert torch.equal(ours.running_mean, theirs.running_mean) and torch.equal(ours.running_var, theirs.running_var)
    assert torch.equal(ours.running_mean, torch.zeros(3))


def test_state_dicts_load_both_ways_with_every_option_on():
    ours = bnlab.BatchNorm2d(3, **OPTIONS)
    for _ in range(4):
        ours(torch.randn(4, 3, 3, 3))
    theirs = torch.nn.BatchNorm2d(3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    fresh = bnlab.BatchNorm2d(3, **OPTIONS)
    fresh.load_state_dict(theirs.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_options_are_shown_and_kept_as_attributes():
    layer = bnlab.BatchNorm1d(3, **OPTIONS)
    text = repr(layer)
    for name in OPTIONS:
        assert name in text, name
    assert layer.renorm_ramp == (1, 5) and layer.accumulation_steps == 2
    assert "virtual_batch_size" not in repr(bnlab.BatchNorm1d(3))


def test_whole_layer_pickles_and_a_pre_feature_pickle_still_works():
    layer = bnlab.BatchNorm1d(3, **OPTIONS)
    layer(torch.randn(4, 3))  # leaves a pending accumulation
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.virtual_batch_size == 2
    old = bnlab.BatchNorm1d(3)
    for name in OPTIONS:  # a layer saved before the options existed has none of the attributes
        old.__dict__.pop(name, None)
    buffer = io.BytesIO()
    torch.save(old, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    theirs = torch.nn.BatchNorm1d(3)
    x = torch.randn(5, 3)
    assert_close(loaded(x), theirs(x), 2e-4, "class-level defaults")


@pytest.mark.parametrize(
    "make",
    [
        lambda: bnlab.BatchNorm2d(3),
        lambda: bnlab.BatchNorm2d(3, accumulation_steps=2),
        lambda: bnlab.BatchNormAct2d(3),
        lambda: bnlab.SyncBatchNorm(3),
    ],
)
def test_a_layer_saved_whole_loads_with_weights_only_and_its_class_allowed(make):
    # as torch.nn's: allowing the layer's class is enough (its empty accumulator was pickled, and
    # torch.load(weights_only=True) refused bnlab.variants.accumulate.StatsAccumulator)
    layer = make()
    for _ in range(2):  # two steps: no micro-batch left pending
        layer(torch.randn(4, 3, 2, 2))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals([type(layer)]):
        loaded = torch.load(buffer, weights_only=True)
    for key, value in layer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # the accumulator is made again on loading: accumulated steps go on as in the layer saved
    layer.train(), loaded.train()
    x = torch.randn(6, 3, 2, 2)
    for _ in range(2):
        layer(x), loaded(x)
    assert torch.equal(loaded.running_var, layer.running_var)


def test_pending_micro_batches_are_kept_by_pickling_and_deepcopy():
    import copy

    layer = bnlab.BatchNorm1d(3, accumulation_steps=2)
    first, second = torch.randn(4, 3), torch.randn(5, 3) + 2
    layer(first)  # pending: the running averages wait for the second micro-batch
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        clone(second)
        whole = torch.nn.BatchNorm1d(3)
        whole(torch.cat([first, second]))
        assert_close(clone.running_mean, whole.running_mean, 1e-6, "the pending micro-batch merged")
        assert_close(clone.running_var, whole.running_var, 1e-6, "the pending micro-batch merged")


def test_convert_still_round_trips():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3))
    bnlab.convert(model)
    assert type(model[1]) is bnlab.BatchNorm2d and model[1].skip_nonfinite
    model(torch.randn(2, 3, 4, 4))
    bnlab.convert(model, to="torch")
    assert type(model[1]) is torch.nn.BatchNorm2d


@pytest.mark.parametrize("name, value", [("renorm", 1), ("skip_nonfinite", "yes")])
def test_bool_options_are_checked_by_name(name, value):
    with pytest.raises(TypeError, match=name):
        bnlab.BatchNorm1d(3, **{name: value})


@pytest.mark.parametrize(
    "options, named",
    [
        ({"virtual_batch_size": 2}, "virtual_batch_size=2"),
        ({"renorm": True, "rmax": 2.0}, "renorm=True"),
        ({"accumulation_steps": 3}, "accumulation_steps=3"),
    ],
)
def test_convert_to_torch_warns_of_the_training_options_it_drops(options, named):
    model = torch.nn.Sequential(bnlab.BatchNorm1d(4, **options))
    with pytest.warns(UserWarning, match=rf"convert: BatchNorm1d\(4\) with {named} becomes torch.nn.BatchNorm1d"):
        bnlab.convert(model, to="torch")
    assert type(model[0]) is torch.nn.BatchNorm1d


def test_convert_to_torch_is_silent_without_such_options(recwarn):
    bnlab.convert(torch.nn.Sequential(bnlab.BatchNorm2d(3), bnlab.BatchNorm1d(3, skip_nonfinite=False)), to="torch")
    assert not [w for w in recwarn if "convert" in str(w.message)]
