"""The inference-only install, made as a user makes it: the wheel that `python -m build` makes, installed with
its [cpu] extra into a fresh virtual environment: onnxruntime, numpy, Pillow, Click, tqdm, pyspng, and no torch,
onnx or matplotlib. classify and info run there with the main environment's labels; train, export, verify and
data export-png say in one line which extra to install. Slow (a build and an install; pip's cache makes it
seconds when warm), and in the default run on purpose: CI must prove it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from fmnist_onnx import __version__
from fmnist_onnx.table import read_rows
from harness import REPO, assert_one_line_error

# The same releases as the main environment: pip takes them from its cache, and the labels can be compared.
PINNED = ["onnxruntime", "numpy", "pillow", "click", "tqdm", "pyspng"]
# What the inference-only install must not bring: torch with its CUDA libraries alone is gigabytes.
HEAVY = {"torch", "torchvision", "onnx", "onnxscript", "matplotlib", "triton", "onnxruntime-gpu", "ray"}
# Measured: 205 MB (onnxruntime 78, numpy 73, Pillow 22, and pip and setuptools 26, as `python -m venv` makes it;
# 37 MB of it is the bytecode pip compiles at install). The [train] extra adds gigabytes.
MAX_MB = 250

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("notorch")
    build = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(root / "dist"), str(REPO)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = (root / "dist").glob("*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    constraints = root / "constraints.txt"
    constraints.write_text("".join(f"{name}=={version(name)}\n" for name in PINNED))
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "-c", str(constraints), f"{wheel}[cpu]"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


def run_installed(venv: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    """The installed command, from a folder outside the checkout, with nothing of this tree on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "fmnist-onnx"), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=venv, **kw)


def test_the_environment_is_small_and_has_no_torch(venv):
    python = str(venv / "bin" / "python")
    code = ("import json, importlib.metadata as m, fmnist_onnx; "
            "print(json.dumps([fmnist_onnx.__file__, sorted(d.metadata['Name'].lower() for d in m.distributions())]))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=venv)
    assert proc.returncode == 0, proc.stderr
    location, names = json.loads(proc.stdout)
    assert location.startswith(str(venv))  # the installed package, not this checkout
    assert {"fmnist-onnx", "onnxruntime", "numpy", "pillow", "click", "tqdm", "pyspng"} <= set(names)
    assert not HEAVY & {n.replace("_", "-") for n in names}, names
    proc = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, cwd=venv)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    size = sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(venv) for f in files)
    assert size / 1e6 <= MAX_MB, f"{size / 1e6:.0f} MB"  # as `du` counts it


def test_version_of_the_installed_wheel(venv):
    proc = run_installed(venv, "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"fmnist-onnx, version {__version__}", proc


def test_classify_runs_without_torch_and_gives_the_same_labels(venv, onnx_model, test_pngs, tmp_path):
    folder = test_pngs / "Pullover"
    out = tmp_path / "preds.jsonl"
    proc = run_installed(venv, "classify", folder, "-m", onnx_model, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["classified"] == 1000
    assert summary["accuracy_pct"] is not None and os.path.getsize(summary["confusion_png"]) > 1000
    here = tmp_path / "here.jsonl"
    main = subprocess.run([sys.executable, "-m", "fmnist_onnx", "classify", str(folder), "-m", str(onnx_model),
                           "-o", str(here), "--json"], capture_output=True, text=True)
    assert main.returncode == 0, main.stderr
    assert summary["decoder"] == json.loads(main.stdout)["decoder"]  # libspng in both: pyspng is in the core
    assert list(read_rows(out)) == list(read_rows(here))


def test_info_runs_without_torch(venv, onnx_model):
    proc = run_installed(venv, "info", onnx_model)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "669,706" in proc.stdout


def test_bench_runs_without_torch_with_onnxruntime_rows_only(venv, onnx_model, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_installed(venv, "bench", "-m", onnx_model, "--provider", "cpu",
                         "--batch-sizes", "8", "--duration", "0.05", "--json", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    results = json.loads(out.read_text())["results"]
    assert {r["backend"] for r in results} == {"onnxruntime"}, results  # no PyTorch rows without torch
    assert any(r["precision"] == "fp32" and r["batch_size"] == 8 and r["images_per_s"] > 0 for r in results)


@pytest.mark.parametrize("command", [["train"], ["export"], ["verify"], ["data", "export-png", "--out", "pngs"]])
def test_training_commands_name_the_extra_to_install(venv, command):
    proc = run_installed(venv, *command)
    assert_one_line_error(proc, 2, 'pip install "fmnist-onnx[train]"')
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (venv / "pngs").exists() and not (venv / "artifacts").exists()


def test_a_tar_zst_without_the_zstd_extra_is_one_line(venv, onnx_model, test_pngs, tmp_path):
    packed = tmp_path / "s.tar.zst"
    subprocess.run(["tar", "--zstd", "-cf", packed, "-C", test_pngs, "Pullover"], check=True)
    proc = run_installed(venv, "classify", packed, "-m", onnx_model, "-o", tmp_path / "p.csv")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "Error: a .tar.zst needs the zstandard package: pip install 'fmnist-onnx[zstd]'"
