"""peak.py: the matrix-product peaks that the benchmark's roofline percentages are set against."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from fmnist_onnx.peak import matmul_model, matmul_peak


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_matmul_peak_names_its_method(precision):
    peak = matmul_peak("cpu", precision, threads=1, duration_s=0.1, sizes=(128, 256))
    assert peak.precision == precision and peak.method in peak.by_method
    assert peak.gflops == max(peak.by_method.values())
    if len(os.sched_getaffinity(0)) > 1:
        assert "numpy" not in peak.by_method  # numpy's BLAS cannot be held to 1 thread: it must not count
    assert peak.size in (128, 256)
    assert math.isfinite(peak.roofline_images_per_s) and peak.roofline_images_per_s > 0
    assert ("torch" in peak.by_method) == (precision == "fp32")  # torch._int_mm only when asked


@pytest.mark.parametrize("precision, options, torch_timed", [
    ("int8", {"torch_int8": True}, True),
    ("fp32", {"with_torch": False}, False),
])
def test_torch_joins_the_peak_only_where_asked(precision, options, torch_timed):
    """torch._int_mm (about 10 s a call at 2048 without VNNI) only with torch_int8; torch.mm not where bench runs
    no PyTorch backend."""
    peak = matmul_peak("cpu", precision, threads=1, duration_s=0.05, sizes=(64,), **options)
    assert ("torch" in peak.by_method) == torch_timed and "onnxruntime" in peak.by_method


@pytest.mark.parametrize("op, types, dtypes", [
    ("MatMul", (1, 1, 1), (np.float32, np.float32)),
    ("MatMulInteger", (2, 3, 6), (np.uint8, np.int8)),
])
def test_peak_model_written_without_onnx_is_a_valid_matrix_product(op, types, dtypes):
    """peak.py writes its one-node models with the protobuf wire format: onnx must read the same model, and
    onnxruntime must compute the product with it."""
    import onnx
    import onnxruntime as ort

    data = matmul_model(op, 16, *types)
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == [op] and model.opset_import[0].version == 13
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 100, (16, 16)).astype(t) for t in dtypes)
    (c,) = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"A": a, "B": b})
    np.testing.assert_array_equal(c, a.astype(np.int64) @ b.astype(np.int64))


def test_bad_peak_request_is_refused():
    with pytest.raises(ValueError):
        matmul_peak("cuda", "int8")
