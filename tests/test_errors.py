"""errors.py: every exit code comes from the type of the exception that ends the command, through the real CLI
(one test per code), and the types keep their code across a process boundary (pickled by a worker)."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_onnx.errors import CheckFailed, Interrupted, UserError
from fmnist_onnx.files import OutputError
from fmnist_onnx.runtime import ModelRunError
from fmnist_onnx.testing import TRAIN_AFTER_STEP
from harness import Held, assert_one_line_error, run_cli


@pytest.mark.parametrize("error, code", [
    (UserError("x"), 2), (CheckFailed("x"), 1), (OutputError("x"), 4), (ModelRunError("x"), 5),
    (Interrupted(signal.SIGINT), 130), (Interrupted(signal.SIGTERM, Path("c.pt"), "saved"), 143),
])
def test_the_code_is_the_types_and_survives_pickling(error, code):
    assert error.exit_code == code and type(error).exit_code is not None
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and back.exit_code == code and back.line() == error.line()


def test_interrupted_says_where_the_work_is_only_when_it_is_there(tmp_path):
    kept = tmp_path / "checkpoint.pt"
    e = Interrupted(signal.SIGINT, kept, f"checkpoint saved to {kept}")
    assert e.line() == "Interrupted." and Interrupted(signal.SIGINT).line() == "Interrupted."  # nothing saved yet
    kept.write_bytes(b"x")
    assert e.line() == str(e) == f"Interrupted: checkpoint saved to {kept}"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two untrained models (seeds 0 and 1) as model.pth, and the first exported to ONNX: no training."""
    import torch

    from fmnist_onnx.export import export_onnx
    from fmnist_onnx.model import NeuralNetwork

    d = tmp_path_factory.mktemp("untrained")
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(NeuralNetwork().state_dict(), d / f"seed{seed}.pth")
    return {"pth": d / "seed0.pth", "other pth": d / "seed1.pth", "onnx": export_onnx(d / "seed0.pth", d / "m.onnx")}


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    """Three small grey images and a file named .png that is not one."""
    from PIL import Image

    d = tmp_path_factory.mktemp("pngs")
    for i in range(3):
        Image.new("L", (28, 28), 60 * (i + 1)).save(d / f"{i}.png")
    (d / "broken.png").write_bytes(b"not a png")
    return d


def test_exit_1_check_failed(models):
    proc = run_cli("verify", "--weights", models["other pth"], "--model", models["onnx"], "--samples", "100",
                   "--provider", "cpu")
    assert_one_line_error(proc, CheckFailed.exit_code, f"Error: {models['onnx']} does not match")


def test_exit_2_user_error(tmp_path):
    assert_one_line_error(run_cli("info", tmp_path / "nope.onnx"), UserError.exit_code, "not found")


def test_exit_3_some_files_failed(models, pngs, tmp_path):
    proc = run_cli("classify", pngs, "-m", models["onnx"], "-o", tmp_path / "p.csv", "--workers", "1", "-q")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr


def test_exit_4_output_error(models, pngs):
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "fmnist_onnx", "classify", pngs, "-m", models["onnx"], "-q"],
                              stdout=full, stderr=subprocess.PIPE, text=True)
    assert_one_line_error(proc, OutputError.exit_code, "No space left on device")


def _alloc_model(path: Path) -> Path:
    """[N,1,28,28] -> [N,10] logits that also make 2^44 * max(pixel) floats at run time: any image that is not
    all black asks onnxruntime for terabytes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.zeros((784, 10), np.float32), "w"),
             numpy_helper.from_array(np.array([2.0**44], np.float32), "k")]
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["mm"]),
             helper.make_node("ReduceMax", ["input"], ["m"], keepdims=0), helper.make_node("Mul", ["m", "k"], ["mk"]),
             helper.make_node("Cast", ["mk"], ["n"], to=TensorProto.INT64),
             helper.make_node("ConstantOfShape", ["n"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
             helper.make_node("Add", ["mm", "s"], ["logits"])]
    graph = helper.make_graph(nodes, "alloc",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (32 << 30, 32 << 30))  # the terabytes fail, overcommit or not


def test_exit_5_model_run_error(pngs, tmp_path):
    model = _alloc_model(tmp_path / "alloc.onnx")
    proc = run_cli("classify", pngs, "-m", model, "-o", tmp_path / "p.csv", "--workers", "1", "--provider", "cpu",
                   "-q", preexec_fn=_limit_memory)
    assert_one_line_error(proc, ModelRunError.exit_code, "could not allocate")


def test_exit_143_interrupted_by_sigterm(tmp_path):
    cmd = [sys.executable, "-m", "fmnist_onnx", "train", "--epochs", "1", "--device", "cpu", "-q", "--out-dir",
           str(tmp_path)]
    with Held(cmd, f"{TRAIN_AFTER_STEP}:1", stderr=subprocess.PIPE, text=True) as held:
        held.wait()
        held.proc.send_signal(signal.SIGTERM)
        held.release()
        _, stderr = held.proc.communicate(timeout=120)
    assert held.proc.returncode == 128 + signal.SIGTERM == Interrupted(signal.SIGTERM).exit_code, stderr
    assert stderr == (f"Interrupted: checkpoint saved to {tmp_path / 'checkpoint.pt'}; run again with --resume to "
                      "continue.\n")
