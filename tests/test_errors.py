"""Bad input gets an error that names the argument, says what was expected and what was given."""

from __future__ import annotations

import math

import pytest
import torch

import bnlab
from bnlab.functional import batch_norm


@pytest.mark.parametrize(
    "num_features,error,words",
    [
        (0, ValueError, ["num_features", "positive int", "0"]),
        (-3, ValueError, ["num_features", "-3"]),
        (2.5, TypeError, ["num_features", "float", "2.5"]),
        ("4", TypeError, ["num_features", "str"]),
        (True, TypeError, ["num_features", "bool"]),
    ],
)
def test_bad_num_features(num_features, error, words):
    with pytest.raises(error) as info:
        bnlab.BatchNorm2d(num_features)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("eps", [0.0, -1e-5, math.inf, math.nan])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps: expected a finite float > 0"):
        bnlab.BatchNorm1d(3, eps=eps)


def test_eps_of_wrong_type():
    with pytest.raises(TypeError, match="eps: .* got str"):
        bnlab.BatchNorm1d(3, eps="1e-5")


@pytest.mark.parametrize("momentum", [math.nan, math.inf, -math.inf])
def test_non_finite_momentum(momentum):
    with pytest.raises(ValueError, match="momentum: expected a finite float"):
        bnlab.BatchNorm1d(3, momentum=momentum)


def test_integer_dtype_for_parameters():
    with pytest.raises(TypeError, match="dtype: expected a floating-point dtype.*torch.int64"):
        bnlab.BatchNorm1d(3, dtype=torch.int64)


@pytest.mark.parametrize(
    "layer,shape,expected",
    [
        (bnlab.BatchNorm1d, (2, 3, 4, 4), "2D \\(N, C\\) or 3D \\(N, C, L\\)"),
        (bnlab.BatchNorm1d, (3,), "rank >= 2"),
        (bnlab.BatchNorm2d, (2, 3), "4D \\(N, C, H, W\\).*got 2D"),
        (bnlab.BatchNorm3d, (2, 3, 4, 4), "5D \\(N, C, D, H, W\\).*got 4D"),
    ],
)
def test_wrong_rank(layer, shape, expected):
    with pytest.raises(ValueError, match=f"input: .*{expected}"):
        layer(3)(torch.randn(shape))


def test_channel_count_mismatch():
    with pytest.raises(ValueError, match=r"input: expected 3 channels on dim 1 \(num_features=3\), got .*\(4, 5\) with 5"):
        bnlab.BatchNorm1d(3)(torch.randn(4, 5))


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training_is_a_value_error_and_changes_no_state(shape):
    layer = {2: bnlab.BatchNorm1d, 3: bnlab.BatchNorm1d, 4: bnlab.BatchNorm2d}[len(shape)](3)
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        layer(torch.randn(shape))
    assert int(layer.num_batches_tracked) == 0
    layer.eval()
    assert layer(torch.randn(shape)).shape == shape  # eval mode accepts a single sample


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8])
def test_non_floating_input(dtype):
    x = torch.ones(4, 3, dtype=dtype)
    with pytest.raises(TypeError, match=f"input: expected a floating-point tensor.*{dtype}"):
        bnlab.BatchNorm1d(3)(x)


@pytest.mark.parametrize("value", [[[1.0, 2.0]], None, 3.0])
def test_input_that_is_not_a_tensor(value):
    with pytest.raises(TypeError, match="input: expected a torch.Tensor"):
        bnlab.BatchNorm1d(2)(value)


def test_functional_argument_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"running_mean: expected shape \(3,\).*got shape \(4,\)"):
        batch_norm(x, torch.zeros(4), torch.ones(3), training=True)
    with pytest.raises(ValueError, match=r"weight: expected shape \(3,\)"):
        batch_norm(x, None, None, torch.ones(3, 1), training=True)
    with pytest.raises(TypeError, match="bias: expected a torch.Tensor"):
        batch_norm(x, None, None, None, [0.0, 0.0, 0.0], training=True)
    with pytest.raises(ValueError, match="running_mean, running_var: expected .* in evaluation mode"):
        batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="running_mean, running_var: expected both tensors or both None"):
        batch_norm(x, torch.zeros(3), None, training=True)
    with pytest.raises(ValueError, match="eps: expected a finite float > 0"):
        batch_norm(x, None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps: expected a finite float >= 0"):
        batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=-1.0)


def test_negative_running_var_in_eval_is_refused():
    layer = bnlab.BatchNorm1d(3).eval()
    layer.running_var[1] = -0.5
    with pytest.raises(ValueError, match=r"running_var: expected non-negative values.*channels \[1\]"):
        layer(torch.randn(4, 3))
    torch_layer = torch.nn.BatchNorm1d(3).eval()
    torch_layer.running_var[1] = -0.5
    assert torch.isnan(torch_layer(torch.randn(4, 3))[:, 1]).all(), "torch.nn returns NaN silently here"


def test_state_dict_with_wrong_shape_names_the_layer_size():
    layer = bnlab.BatchNorm2d(3)
    bad = bnlab.BatchNorm2d(4).state_dict()
    with pytest.raises(RuntimeError, match=r"running_mean: expected shape \(3,\) for BatchNorm2d\(num_features=3\), got \(4,\)") as err:
        layer.load_state_dict(bad)
    message = str(err.value)
    # one message per key: torch's own for the same keys ("copying a param ...") is left out; ours
    # opens with torch's words, which loaders such as Hugging Face's search for
    assert "copying a param" not in message and message.count("running_var: expected shape") == 1, message
    assert message.count("size mismatch for running_var: expected shape") == 1, message
    assert "different number of channels" in message


def test_state_dict_with_a_tensor_of_another_rank_is_not_blamed_on_the_channel_count():
    bad = bnlab.BatchNorm2d(3).state_dict()
    bad["weight"] = bad["weight"].unsqueeze(1)
    with pytest.raises(RuntimeError, match=r"weight: expected shape \(3,\) .* got \(3, 1\): a BN layer holds one value per channel"):
        bnlab.BatchNorm2d(3).load_state_dict(bad)


def test_state_dict_with_missing_keys():
    sd = bnlab.BatchNorm2d(3).state_dict()
    del sd["running_var"]
    with pytest.raises(RuntimeError, match='Missing key.*"running_var"'):
        bnlab.BatchNorm2d(3).load_state_dict(sd)


def test_convert_argument_errors():
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module, got list"):
        bnlab.convert([])
    with pytest.raises(ValueError, match="to: expected 'bnlab' or 'torch', got 'jax'"):
        bnlab.convert(torch.nn.Linear(2, 2), to="jax")


def test_set_backend_unknown_name():
    with pytest.raises(ValueError, match="name: expected one of the registered backends.*'nope'"):
        bnlab.set_backend("nope")


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("training", [True, False])
def test_a_channel_vector_on_another_device_is_refused_by_name(name, training):
    """Guards _checks.check_channel_vector's device check: a (C,) vector on another device than the
    input ("meta" stands in for a GPU, so that this runs anywhere) is refused by name, by
    functional.batch_norm and by an eval-mode layer (its path) whose parameter or buffer alone moved."""
    x = torch.randn(4, 3, 5)
    vectors = {"running_mean": torch.zeros(3), "running_var": torch.ones(3),
               "weight": torch.ones(3), "bias": torch.zeros(3)}
    # a meta input first, whose failure is a clean one: without the check, a CPU input with a meta
    # running_var crashes the CPU kernels (eval), and a meta weight is ignored without an error
    on_meta = {key: v.to("meta") if key != name else v for key, v in vectors.items()}
    with pytest.raises(ValueError, match=f"{name}: expected a tensor on the input's device meta, got one on cpu"):
        batch_norm(x.to("meta"), **on_meta, training=training)
    vectors[name] = vectors[name].to("meta")
    message = f"{name}: expected a tensor on the input's device cpu, got one on meta"
    with pytest.raises(ValueError, match=message):
        batch_norm(x, **vectors, training=training)
    # the layer, in either mode, with and without a mask (a training layer's own path: before the
    # fiftieth session it took a meta weight as no weight, and gave BN without it)
    layer = bnlab.BatchNorm1d(3).train(training)
    # (a meta tensor cannot be given to a CPU parameter's .data: a new Parameter instead)
    setattr(layer, name, vectors[name] if name.startswith("running") else torch.nn.Parameter(vectors[name]))
    with pytest.raises(ValueError, match=message):
        layer(x)
    with pytest.raises(ValueError, match=message):
        layer(x, mask=torch.rand(4, 5) < 0.5)
