"""Shared fixtures, and fixtures only (the helpers are in harness.py), and how pytest-xdist shares the work.
Everything runs on the real dataset (Debian's dataset-fashion-mnist).

The suite runs on the usable cores (`-n auto --dist loadfile` unless told otherwise; `-n 0`, `-p no:xdist` and
`--pdb` run it in one process). Each worker is its own pytest session, so a session fixture would be built once
per worker: the costly ones (the trained model, its ONNX export, the 10,000 PNGs) are built once by whichever
worker asks first, under a file lock in the folder the workers' base folders share, and the others wait and
reuse them. Each test file runs on one worker (its module fixtures are built once), and the files of a group in
TOGETHER on the same one, one after another."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import Unprivileged, foreign_model, run_cli

MAX_WORKERS = 4  # each worker holds its own models, sessions and folders of PNGs; more gain little on this suite
# Test files that must not run beside each other, each group on one worker. pytest-xdist's own xdist_group marks
# are lost on pytest 9.2 (pytest-xdist issue 1386: the group rides on a nodeid that pytest now rebuilds), and
# the controller sees only nodeids, so the groups are named here by file.
TOGETHER = {
    # Ray runtimes and clusters, one at a time as when run alone (ports and memory of one machine); the docs'
    # examples run in reader order in one shared folder, and docs/ray.md's starts Ray
    "test_engines_ray.py": "ray", "test_docs.py": "ray",
    # `python -m build` of this checkout writes build/ and *.egg-info into it
    "test_install.py": "build", "test_no_torch.py": "build",
}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which turns -n into workers
def pytest_cmdline_main(config) -> None:
    """Parallel by default, in this hook rather than addopts so that `-p no:xdist` still parses: `-n auto` where
    no -n was given, and `--dist loadfile` (with TOGETHER's groups) where no --dist was; a worker is one already."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    if config.option.numprocesses is None:
        config.option.numprocesses = "auto"
    if config.option.dist == "no":
        config.option.dist = "loadfile"


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: unknown under -p no:xdist
def pytest_xdist_auto_num_workers(config) -> int | None:
    """`-n auto`: the cores this process may use (affinity and cgroup quota, as the tool counts them), not the
    machine's count, at most MAX_WORKERS; a PYTEST_XDIST_AUTO_NUM_WORKERS of the user's wins (xdist reads it)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    from fmnist_onnx.runtime import usable_cores

    return max(1, min(usable_cores(), MAX_WORKERS))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the files of a TOGETHER group as one unit of work: it goes to one worker, whole."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Together(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return TOGETHER.get(Path(file).name, file)

    return Together(config, log)


@pytest.fixture(scope="session")
def shared(request, tmp_path_factory) -> Callable[[str, Callable[[Path], object]], Path]:
    """``shared(name, build)``: the folder ``name``, made by ``build(folder)`` once for the whole run: alone, in this
    session's base folder; under pytest-xdist, in the folder all workers' base folders share, by the first worker
    to ask while the others wait on its lock (pytest-xdist's documented recipe). A build that failed is tried
    again by the next worker, which then reports its own failure."""
    from filelock import FileLock

    worker = hasattr(request.config, "workerinput")
    root = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()

    def get(name: str, build: Callable[[Path], object]) -> Path:
        folder, done = root / name, root / f"{name}.done"
        with FileLock(root / f"{name}.lock"):
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                build(folder)
                done.touch()
        return folder

    return get


@pytest.fixture(scope="session")
def trained_dir(shared) -> Path:
    """A real training run (fast recipe, 2 epochs: about 88% test accuracy): model.pth and metrics.json."""
    return shared("trained", lambda out: run_cli("train", "--epochs", "2", "--out-dir", out, "--quiet", check=True))


@pytest.fixture(scope="session")
def weights(trained_dir) -> Path:
    return trained_dir / "model.pth"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(shared):
    """Keep the dataset cache of the tests apart from the user's (one for all workers: its files are written
    atomically)."""
    os.environ.setdefault("XDG_CACHE_HOME", str(shared("cache", lambda _: None)))


@pytest.fixture(scope="session")
def onnx_model(weights, shared) -> Path:
    """The `weights` fixture exported to ONNX (fp32, opset 18, symbolic batch axis), without the parity check."""
    from fmnist_onnx.export import export_onnx

    return shared("onnx", lambda out: export_onnx(weights, out / "model.onnx")) / "model.onnx"


@pytest.fixture(scope="session")
def test_pngs(shared) -> Path:
    """The 10,000 test images as PNG files in the ImageFolder layout, written by `data export-png`."""
    return shared("pngs", lambda out: run_cli("data", "export-png", "--split", "test", "--out", out / "test",
                                              "--quiet", check=True)) / "test"


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
