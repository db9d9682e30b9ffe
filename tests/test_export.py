"""export.py and `fmnist-onnx export`: a checked, self-describing ONNX model with a symbolic batch axis."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fmnist_onnx import spec
from fmnist_onnx.export import sha256_file


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_passes_full_checker_and_has_the_signature(onnx_model):
    model = onnx.load(onnx_model)
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == spec.INPUT_NAME and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(inp) == ["batch", 1, 28, 28]
    assert out.name == spec.OUTPUT_NAME and _dims(out) == ["batch", 10]


@pytest.mark.parametrize("batch", [1, 4096])
def test_symbolic_batch_axis_runs_any_batch(onnx_model, batch):
    sess = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(batch).random((batch, 1, 28, 28), dtype=np.float32)
    assert sess.run(None, {spec.INPUT_NAME: x})[0].shape == (batch, 10)


def test_metadata_describes_the_model(onnx_model, weights):
    meta = {p.key: p.value for p in onnx.load(onnx_model).metadata_props}
    assert json.loads(meta["classes"]) == list(spec.CLASSES)
    assert meta["preprocessing"] == spec.PREPROCESSING
    assert meta["weights_sha256"] == sha256_file(weights)
    metrics = json.loads((weights.parent / "metrics.json").read_text())
    assert float(meta["test_accuracy"]) == pytest.approx(metrics["test_accuracy"], abs=0.005)
    producer = json.loads(meta["producer"])
    assert producer["torch"] == __import__("torch").__version__ and producer["onnx"] == onnx.__version__
