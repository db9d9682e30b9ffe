"""info.py and `fmnist-onnx info`: what a model is, shown without torch; bad models refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import onnxruntime as ort
import pytest

from fmnist_onnx import spec
from harness import REPO, assert_one_line_error, run_cli

# Runs the CLI where importing torch (or torchvision) fails, as on a machine with only the inference packages.
NO_TORCH = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "
            "from fmnist_onnx.cli import main; sys.argv[0] = 'fmnist-onnx'; main()")


def info_without_torch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, "info", *map(str, args)], capture_output=True, text=True)


def test_shows_signature_opset_metadata_and_providers_without_torch(onnx_model):
    proc = info_without_torch(onnx_model)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "input: float32 [batch, 1, 28, 28]" in out and "logits: float32 [batch, 10]" in out
    assert "opset       18" in out and "669,706" in out  # 784*512+512 + 512*512+512 + 512*10+10
    assert ", ".join(spec.CLASSES) in out and "weights_sha256" in out
    for provider in ort.get_available_providers():
        assert provider in out


def test_json(onnx_model):
    proc = info_without_torch(onnx_model, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["inputs"] == [{"name": "input", "type": "float32", "shape": ["batch", 1, 28, 28]}]
    assert info["file_size_bytes"] == onnx_model.stat().st_size and info["quantized"] is False
    assert json.loads(info["metadata"]["classes"]) == list(spec.CLASSES)


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_int8_model(onnx_model, tmp_path, method):
    from fmnist_onnx.export import quantize_int8
    from fmnist_onnx.info import is_int8

    int8 = quantize_int8(onnx_model, tmp_path / "model.int8.onnx", method=method)
    info = json.loads(info_without_torch(int8, "--json").stdout)
    assert info["quantized"] is True and info["parameters"] == 669_706
    assert info["metadata"]["quantization"].startswith(f"int8 {method}")
    assert is_int8(int8) and not is_int8(onnx_model)  # the one test of "int8?" that export, verify, bench use


def test_not_onnx(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00\x01 not a protobuf model")
    assert_one_line_error(run_cli("info", bad), 2, str(bad))


def test_a_text_file_is_not_an_onnx_model_in_one_line_of_ours():
    """onnxruntime's framing ("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from ...") stays out."""
    proc = run_cli("info", REPO / "README.md")
    assert_one_line_error(proc, 2, "README.md: not an ONNX model (protobuf parsing failed)")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "ONNXRuntime" not in proc.stderr and "INVALID_PROTOBUF" not in proc.stderr, proc.stderr


def test_missing(tmp_path):
    assert_one_line_error(run_cli("info", tmp_path / "nope.onnx"), 2, "not found")


@pytest.mark.parametrize("what, says", [("3x32x32 input", "3, 32, 32]"), ("5 outputs", "found 1 and 5")])
def test_another_signature(what, says, foreign_onnx):
    proc = run_cli("info", foreign_onnx[what])
    assert_one_line_error(proc, 2, says)
    assert len(proc.stderr.strip().splitlines()) == 1
