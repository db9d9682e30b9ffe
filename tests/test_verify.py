"""verify.py and `fmnist-onnx verify`: parity on the real test set, and failures that are really caught."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from fmnist_onnx.verify import compare_logits, top1_ties, verify
from harness import assert_one_line_error, cli_run, run_cli


@pytest.fixture(scope="module")
def tampered_model(onnx_model, tmp_path_factory):
    """The exported model with one bias of the last layer nudged by 1e-3: top-1 barely moves, logits do."""
    model = onnx.load(str(onnx_model))
    init = next(i for i in model.graph.initializer if i.name == "linear_relu_stack.4.bias")
    bias = numpy_helper.to_array(init).copy()
    bias[3] += 1e-3
    init.CopyFrom(numpy_helper.from_array(bias, init.name))
    path = tmp_path_factory.mktemp("tampered") / "model.onnx"
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def perturbed_weights(weights, tmp_path_factory):
    """Other weights: the trained ones plus small noise, saved as a new model.pth."""
    g = torch.Generator().manual_seed(1)
    state = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in torch.load(weights, weights_only=True).items()}
    path = tmp_path_factory.mktemp("perturbed") / "model.pth"
    torch.save(state, path)
    return path


def test_compare_logits_is_polygraphys_rule():
    expected = np.array([1.0, 1.0, 0.01, 100.0])
    actual = expected + np.array([0.0, 2e-4, 2e-4, 0.05])
    # 2e-4 on 1.0 is within rtol 1e-3; 2e-4 on 0.01 exceeds atol 1e-4 and rtol*|b|; 0.05 on 100 is within rtol.
    stats = compare_logits(actual, expected, atol=1e-4, rtol=1e-3)
    assert stats["failing_elements"] == 1
    assert stats["min_passing_atol"] == pytest.approx(2e-4)
    assert stats["max_abs_diff"] == pytest.approx(0.05)
    assert compare_logits(actual, expected, atol=stats["min_passing_atol"], rtol=1e-3)["failing_elements"] == 0


def test_parity_on_the_whole_test_set(onnx_model, weights):
    report = verify(onnx_model, weights, ("cpu",))
    (r,) = report.results
    assert report.passed and report.mode == "fp32" and report.samples == r.samples == 10_000
    assert r.failing_elements == 0 and r.max_abs_diff < 1e-4 and r.top1_agreement_pct == 100.0
    assert r.onnx_accuracy_pct == r.torch_accuracy_pct > 80
    assert report.weights_match_metadata is True


def test_cli_passes_and_writes_json(onnx_model, weights, tmp_path):
    out = tmp_path / "verify.json"
    proc = run_cli("verify", "--weights", weights, "--model", onnx_model, "--provider", "cpu", "--samples", "2000",
                   "--json", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["passed"] and report["samples"] == 2000 and report["atol"] == 1e-4 and report["rtol"] == 1e-3
    assert [r["provider"] for r in report["results"]] == ["cpu"] and "PASS" in proc.stdout


def test_cli_fails_a_model_whose_weights_were_changed(tampered_model, weights, tmp_path):
    out = tmp_path / "verify.json"
    proc = run_cli("verify", "--weights", weights, "--model", tampered_model, "--json", out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "Traceback" not in proc.stderr
    (r,) = json.loads(out.read_text())["results"]
    assert not r["passed"] and r["failing_elements"] > 0
    assert r["min_passing_atol"] == pytest.approx(1e-3, rel=0.01)  # exactly the nudge


def test_cli_fails_the_right_model_against_other_weights(onnx_model, perturbed_weights):
    proc = run_cli("verify", "--weights", perturbed_weights, "--model", onnx_model)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "metadata names other weights" in proc.stdout


def test_int8_is_judged_by_agreement_and_accuracy(onnx_model, weights, tmp_path):
    from fmnist_onnx.export import quantize_int8

    int8 = quantize_int8(onnx_model, tmp_path / "model.int8.onnx", method="dynamic")
    report = verify(int8, weights, ("cpu",))
    (r,) = report.results
    assert report.mode == "int8" and report.passed
    assert r.max_abs_diff > 1e-4  # logits move under int8: an fp32 check would have failed it
    assert r.top1_agreement_pct >= 98 and abs(r.accuracy_change_points) <= 0.5
    untrained = tmp_path / "untrained.pth"
    from fmnist_onnx.model import NeuralNetwork

    torch.save(NeuralNetwork().state_dict(), untrained)
    assert not verify(int8, untrained, ("cpu",)).passed


def test_top1_ties_counts_exact_ties_for_the_top_only():
    logits = np.array([[1.0, 3.0, 3.0], [1.0, 2.0, 3.0], [5.0, 5.0, 1.0], [3.0, 1.0, 1.0], [2.0, 2.0 + 1e-6, 0.0]])
    assert top1_ties(logits) == 2


def test_int8_keeps_its_logits_in_float(onnx_model, weights, tmp_path):
    """export's int8 (static, the last layer in float) against the same quantization with uint8 logits: the
    logits are no longer clipped to 256 values, the exact ties for the top class are gone, and agreement with
    PyTorch is at least as high."""
    from fmnist_onnx.export import quantize_int8

    new = quantize_int8(onnx_model, tmp_path / "model.int8.onnx")
    old = quantize_int8(onnx_model, tmp_path / "uint8_logits.onnx", per_channel=False, float_logits=False)
    producer = {o: n.op_type for n in onnx.load(str(new)).graph.node for o in n.output}
    assert producer["logits"] in ("Gemm", "MatMul", "Add")  # not a DequantizeLinear of uint8 logits
    (n,), (o,) = verify(new, weights, ("cpu",)).results, verify(old, weights, ("cpu",)).results
    assert n.passed and n.top1_ties <= 2 and n.top1_agreement_pct >= 99.68
    assert o.top1_ties > 2  # the flaw this fixes, still there the old way
    assert n.top1_agreement_pct >= o.top1_agreement_pct


def test_any_batch_size_gives_the_same_logits(onnx_model):
    # The check runs in batches of 1000; a model specialized to one batch size would break at others.
    sess = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((7, 1, 28, 28), dtype=np.float32)
    whole = sess.run(None, {"input": x})[0]
    one_by_one = np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(7)])
    np.testing.assert_allclose(one_by_one, whole, atol=1e-5)


# --------------------------------------------------------------------------------------------- bad input
# Refusals run in this process (cli_run), but where the whole stderr of a process is what is checked.


def test_model_that_is_not_onnx(weights, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("not a model\n")
    assert_one_line_error(cli_run("verify", "--weights", weights, "--model", bad), 2, str(bad))


def test_missing_model(weights, tmp_path):
    assert_one_line_error(cli_run("verify", "--weights", weights, "--model", tmp_path / "nope.onnx"), 2, "not found")


def test_missing_weights(onnx_model, tmp_path):
    assert_one_line_error(cli_run("verify", "--weights", tmp_path / "nope.pth", "--model", onnx_model), 2,
                          "not found")


@pytest.mark.parametrize("what, says", [("3x32x32 input", "[batch, 1, 28, 28]"), ("5 outputs", "one output")])
def test_model_with_another_signature(what, says, foreign_onnx, weights):
    proc = run_cli("verify", "--weights", weights, "--model", foreign_onnx[what])
    assert_one_line_error(proc, 2, says)
    said = [line for line in proc.stderr.strip().splitlines() if not line.startswith("verify: ")]  # progress
    assert len(said) == 1, proc.stderr


def test_explicit_cuda_without_cuda_is_an_error(onnx_model, weights):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    proc = cli_run("verify", "--weights", weights, "--model", onnx_model, "--provider", "cuda")
    assert_one_line_error(proc, 2, "CUDAExecutionProvider")


def _report(mode: str, passed: bool):
    from fmnist_onnx.verify import ProviderResult, VerifyReport

    report = VerifyReport("m.onnx", "m.pth", mode, 1e-4, 1e-3, 0.5, 98.0, 10_000, "a", "a")
    report.results.append(ProviderResult("cpu", passed, [] if passed else ["top-1 differs on 1 of 10000 images"],
                                         10_000, 100.0, 0, 88.0, 88.0, 0.0, 0, 2e-5, 1e-6, 0.128, 1e-4, 0.0, 1.0))
    return report


@pytest.mark.parametrize("passed", [True, False])
def test_the_pass_line_says_what_it_checked(passed):
    """A max rel of 0.128 beside PASS is explained on the line itself: each logit within atol OR rtol."""
    from fmnist_onnx.verify import format_report

    lines = format_report(_report("fp32", passed)).splitlines()
    verdict = next(line for line in lines if line.strip().startswith("cpu:"))
    assert ("PASS" if passed else "FAIL") in verdict
    assert "atol 0.0001 or within rtol 0.001" in verdict and "top-1" in verdict, verdict
    assert "max rel 0.128" in lines[2] and "near 0" in lines[2], lines


def test_the_int8_pass_line_names_its_own_checks():
    from fmnist_onnx.verify import format_report

    verdict = format_report(_report("int8", True)).splitlines()[1]
    assert "PASS" in verdict and ">= 98%" in verdict and "0.5 points" in verdict and "atol" not in verdict, verdict
