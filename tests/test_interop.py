"""The exported model in a second, independent runtime: onnx's ReferenceEvaluator (the operators' reference
implementations, in numpy) runs the fp32 file and must agree with onnxruntime and PyTorch on real test images.
Other clients (OpenVINO, onnxruntime-node, Polygraphy) were tried by hand; see docs/runtimes.md."""

from __future__ import annotations

import numpy as np

SAMPLES = 1000
ATOL = 1e-4  # fp32 logits of three runtimes that sum in different orders: measured differences are about 3e-6


def test_reference_evaluator_agrees_with_onnxruntime_and_pytorch(onnx_model, weights):
    import onnx
    from onnx.reference import ReferenceEvaluator

    from fmnist_onnx.runtime import open_session
    from fmnist_onnx.verify import load_test_set, session_logits, torch_logits

    test = load_test_set(SAMPLES)
    assert test.images.shape == (SAMPLES, 1, 28, 28)
    proto = onnx.load(str(onnx_model))
    name = proto.graph.input[0].name
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch: all 1,000 in one call
    reference = ReferenceEvaluator(proto).run(None, {name: test.images})[0]
    ort = session_logits(open_session(onnx_model, "cpu"), test.images)
    torch = torch_logits(weights, test.images)

    assert reference.shape == ort.shape == torch.shape == (SAMPLES, 10)
    assert np.isfinite(reference).all()
    for other in (ort, torch):
        np.testing.assert_array_equal(reference.argmax(1), other.argmax(1))
        assert np.abs(reference - other).max() <= ATOL
    # Agreement means something only for a model that works: most labels are right.
    assert (reference.argmax(1) == test.labels).mean() > 0.8
