"""Shared fixtures. Everything runs on the real dataset (Debian's dataset-fashion-mnist)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m fmnist_onnx ARGS`` as a real process; stdout and stderr captured as text."""
    proc = subprocess.run([sys.executable, "-m", "fmnist_onnx", *map(str, args)], capture_output=True, text=True,
                          **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int = 2, contains: str = "") -> None:
    """The CLI's contract for user mistakes: exit ``code``, an 'Error:' line naming the problem, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Error" in proc.stderr, proc.stderr
    if contains:
        assert contains in proc.stderr, proc.stderr


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    """A real training run (fast recipe, 2 epochs: about 88% test accuracy): model.pth and metrics.json."""
    out = tmp_path_factory.mktemp("trained")
    run_cli("train", "--epochs", "2", "--out-dir", out, "--quiet", check=True)
    return out


@pytest.fixture(scope="session")
def weights(trained_dir) -> Path:
    return trained_dir / "model.pth"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep the dataset cache of the tests apart from the user's."""
    os.environ.setdefault("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def onnx_model(weights, tmp_path_factory) -> Path:
    """The `weights` fixture exported to ONNX (fp32, opset 18, symbolic batch axis), without the parity check."""
    from fmnist_onnx.export import export_onnx

    return export_onnx(weights, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="session")
def test_pngs(tmp_path_factory) -> Path:
    """The 10,000 test images as PNG files in the ImageFolder layout, written by `data export-png`."""
    out = tmp_path_factory.mktemp("pngs") / "test"
    run_cli("data", "export-png", "--split", "test", "--out", out, "--quiet", check=True)
    return out


def _foreign_model(path: Path, input_shape: list, outputs: int, classes: int) -> Path:
    """A valid ONNX classifier that is not this one: another input shape, or several outputs."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    features = int(np.prod(input_shape[1:]))
    w = numpy_helper.from_array(np.zeros((features, classes), np.float32), "w")
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["out0"])]
    nodes += [helper.make_node("Identity", ["out0"], [f"out{i}"]) for i in range(1, outputs)]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)]
    outs = [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, ["batch", classes]) for i in range(outputs)]
    graph = helper.make_graph(nodes, "foreign", inputs, outs, initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="session")
def foreign_onnx(tmp_path_factory) -> dict[str, Path]:
    """Valid ONNX models with another signature, by what is wrong: {'3x32x32 input': ..., '5 outputs': ...}."""
    d = tmp_path_factory.mktemp("foreign")
    return {"3x32x32 input": _foreign_model(d / "cifar.onnx", ["batch", 3, 32, 32], 1, 5),
            "5 outputs": _foreign_model(d / "five.onnx", ["batch", 1, 28, 28], 5, 10)}
