"""Shared fixtures, and fixtures only (the helpers are in harness.py). Everything runs on the real dataset
(Debian's dataset-fashion-mnist)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import Unprivileged, foreign_model, run_cli


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


@pytest.fixture(scope="session")
def foreign_onnx(tmp_path_factory) -> dict[str, Path]:
    """Valid ONNX models with another signature, by what is wrong: {'3x32x32 input': ..., '5 outputs': ...}."""
    d = tmp_path_factory.mktemp("foreign")
    return {"3x32x32 input": foreign_model(d / "cifar.onnx", ["batch", 3, 32, 32], 1, 5),
            "5 outputs": foreign_model(d / "five.onnx", ["batch", 1, 28, 28], 5, 10)}


@pytest.fixture(scope="session")
def nobody():
    """An Unprivileged runner, checked: its Python runs as that user and imports this package."""
    who = Unprivileged()
    try:
        probe = who.run([sys.executable, "-c", "import os, fmnist_onnx.images; print(os.geteuid())"])
        want = str(who.kwargs.get("user", os.geteuid()))
        assert probe.stdout.split() == [want], f"cannot run Python as an unprivileged user:\n{probe.stderr}"
        yield who
    finally:
        shutil.rmtree(who.folder, ignore_errors=True)


def _mount(*args: str | Path) -> None:
    try:
        proc = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(name, size)``: a fresh tmpfs of ``size`` mounted at tmp_path/name; unmounted at teardown."""
    mounted: list[Path] = []

    def mount(name: str = "disk", size: str = "64k") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", folder)
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # still busy: detach it
