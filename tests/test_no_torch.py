"""The inference path runs where torch is not installed: a second, small virtual environment with
onnxruntime, numpy, Pillow, Click and tqdm only (no pyspng either: Pillow's decoding is the fallback), and
the package from this checkout on PYTHONPATH. Slow (pip installs, from pip's cache when warm), and in the
default run on purpose: CI must prove it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from conftest import REPO
from fmnist_onnx.sinks import read_rows

# The same releases as the main environment: pip takes them from its cache, and nothing else changes.
PACKAGES = ["onnxruntime", "numpy", "pillow", "click", "tqdm"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    venv = tmp_path_factory.mktemp("notorch") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = str(venv / "bin" / "python")
    pins = [f"{name}=={version(name)}" for name in PACKAGES]
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return python


def run_bare(python: str, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([python, *args], capture_output=True, text=True, env=env, **kw)


def test_the_environment_has_no_torch(bare_python):
    proc = run_bare(bare_python, "-c", "import torch")
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    proc = run_bare(bare_python, "-c", "import fmnist_onnx, onnxruntime, PIL; print(fmnist_onnx.__file__)")
    assert proc.returncode == 0 and proc.stdout.startswith(str(REPO)), proc.stderr


def test_classify_runs_without_torch_and_gives_the_same_labels(bare_python, onnx_model, test_pngs, tmp_path):
    folder = test_pngs / "Pullover"
    out = tmp_path / "preds.jsonl"
    proc = run_bare(bare_python, "-m", "fmnist_onnx", "classify", str(folder), "-m", str(onnx_model),
                    "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["decoder"] == "Pillow" and summary["classified"] == 1000
    assert summary["accuracy_pct"] is not None and os.path.getsize(summary["confusion_png"]) > 1000
    here = tmp_path / "here.jsonl"
    main = subprocess.run([sys.executable, "-m", "fmnist_onnx", "classify", str(folder), "-m", str(onnx_model),
                           "-o", str(here), "--json"], capture_output=True, text=True)
    assert main.returncode == 0, main.stderr
    assert json.loads(main.stdout)["decoder"] != "Pillow"  # the fast path, for the comparison to mean something
    assert list(read_rows(out)) == list(read_rows(here))  # Pillow and libspng decode PNG identically


def test_info_runs_without_torch(bare_python, onnx_model):
    proc = run_bare(bare_python, "-m", "fmnist_onnx", "info", str(onnx_model))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
