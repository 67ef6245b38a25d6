"""Models with bnlab's layers export to ONNX, both ways torch.onnx.export works, and compute what
the eager model computes.

Before: the TorchScript-based export (``dynamo=False``, torch.jit.trace underneath) wrote the
example's BN output into the file as a constant (tests/test_jit_trace.py), and the default export
(``dynamo=True``) stopped with a ConversionError at bnlab's eval operator, which it could not
translate (bnlab.custom_ops_export). Oracle: the eager float32 model on inputs the export never
saw, against the ONNX file run by onnx's reference evaluator.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import bnlab
from bnlab import custom_ops
from conftest import randomize_state_

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) needs it
from onnx.reference import ReferenceEvaluator  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")  # the exporters' notes and deprecations


def _prepared(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_state_(m)
    return model.eval()


MODELS = {
    # BN after a conv (the exporter folds it into the Conv), after a ReLU (BatchNormalization stays),
    # without affine parameters, in a residual block with the fused layer, and after a Linear
    "conv-bn-relu": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4), nn.ReLU()), (2, 3, 7, 7)),
    "relu-bn-noaffine": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), bnlab.BatchNorm2d(4, affine=False)), (2, 3, 7, 7)),
    "bn-act": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), bnlab.BatchNormAct2d(4, activation="relu")), (2, 3, 5, 5)),
    "linear-bn1d": (lambda: nn.Sequential(nn.Linear(5, 6), bnlab.BatchNorm1d(6)), (8, 5)),
    "bn3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.ReLU(), bnlab.BatchNorm3d(3)), (2, 2, 4, 5, 3)),
}


def _export(model, example, dynamo: bool) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model, (example,), dynamo=True, verbose=False).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, (example,), buffer, dynamo=False)
        return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamo", [True, False], ids=["torch.export", "torchscript"])
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_model_computes_the_eager_outputs(name, dynamo):
    make, shape = MODELS[name]
    model = _prepared(make())
    gen = torch.Generator().manual_seed(3)
    example = torch.randn(shape, generator=gen)
    proto = _export(model, example, dynamo)
    ops = [node.op_type for node in proto.graph.node]
    assert not any("bnlab" in node.domain or "batch_norm" in node.op_type for node in proto.graph.node), ops
    session = ReferenceEvaluator(proto)
    feed = proto.graph.input[0].name
    for scale in (3.0, -0.5):  # inputs the export never saw
        x = torch.randn(shape, generator=gen) * scale + 1
        got = session.run(None, {feed: x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * max(1.0, float(np.abs(want).max())))


@pytest.mark.skipif(not custom_ops.AVAILABLE, reason="bnlab's operators need torch >= 2.4")
def test_the_exported_program_keeps_the_operator_until_decomposed():
    """torch.export keeps bnlab's operator (its bits); torch._decomp's table turns it into ATen's BN."""
    model = _prepared(nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    exported = torch.export.export(model, (x,))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert f"bnlab.batch_norm_eval.{custom_ops.OVERLOAD}" in targets
    ours = torch._decomp.get_decompositions([getattr(torch.ops.bnlab.batch_norm_eval, custom_ops.OVERLOAD)])
    assert len(ours) == 1  # registered with torch._decomp (the whole table would lower ATen's BN too)
    lowered = exported.run_decompositions(ours)
    targets = [str(node.target) for node in lowered.graph.nodes if node.op == "call_function"]
    assert "aten._native_batch_norm_legit_no_training.default" in targets and not any("bnlab" in t for t in targets)
    probe = torch.randn(2, 3, 6, 6) * 2
    with torch.no_grad():
        torch.testing.assert_close(lowered.module()(probe), model(probe), rtol=2e-4, atol=2e-4)


def test_a_dynamic_batch_exports_and_runs_at_other_batch_sizes():
    model = _prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), bnlab.BatchNorm2d(4)))
    gen = torch.Generator().manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (torch.randn(2, 3, 6, 6, generator=gen),), dynamo=True, verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )  # fmt: skip
    proto = program.model_proto
    assert "BatchNormalization" in [node.op_type for node in proto.graph.node]
    session = ReferenceEvaluator(proto)
    for n in (1, 5):
        x = torch.randn(n, 3, 6, 6, generator=gen)
        got = session.run(None, {proto.graph.input[0].name: x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=2e-4, atol=2e-4)
