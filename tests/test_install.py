"""The install paths people deploy with: the wheel and sdist that `python -m build` makes, what each extra
resolves to ([cpu], [gpu], [train,cpu]) without downloading it, the wheel alone (no runtime: one clear line),
and both onnxruntime packages in one environment (one warning line with the fix). The inference-only install
itself is tests/test_no_torch.py. Most are slow (builds, virtual environments, pip), and in the default run on
purpose: CI must prove them. And the README's two commands install what they need, the way CI runs them."""

from __future__ import annotations

import email
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from fmnist_onnx import __version__
from fmnist_onnx.runtime import BOTH_RUNTIMES_FIX
from harness import REPO, assert_one_line_error

# pip resolves a dry run from metadata alone since 25.3 (before, it downloaded every wheel it resolved: 1.6 GB
# for [gpu]); fast-deps reads a wheel's metadata with HTTP range requests where the index does not serve it
# apart (PEP 658). Measured: each extra resolves in 3-16 s and nothing but metadata is fetched.
RESOLVER_PIP = "pip==26.3"
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]  # as in the README's commands
CORE = {"click", "numpy", "pillow", "tqdm", "pyspng", "jinja2", "braceexpand"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def make_venv(path: Path) -> Path:
    run(sys.executable, "-m", "venv", path)
    return path / "bin"


def readme_commands() -> dict[str, str]:
    """The README's two commands: the whole job, and the tests (each the one line of a bash block)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    return {"job": blocks[0], "tests": blocks[1]}


def test_readme_commands_pin_torch_and_install_the_extras_they_use():
    commands = readme_commands()
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("apt-get")]
    assert ci == [commands["tests"]]  # .ci/run runs the README's test command, verbatim
    for name, extras in (("job", "train,cpu,parquet"), ("tests", "train,cpu,test,ray")):
        command = commands[name]
        assert "\n" not in command and command.startswith("apt-get update"), command
        assert f'pip install{" -q" if name == "tests" else ""} {" ".join(TORCH_PINS)} -e ".[{extras}]"' in command
    assert "chromium" in commands["tests"]  # the HTML report is rendered in Debian's chromium by its tests


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel, as `python -m build` makes them from this checkout."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, REPO)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_string(z.read(name).decode())


@pytest.mark.slow
def test_build_makes_a_wheel_and_an_sdist(dist):
    assert dist["wheel"].name == f"fmnist_onnx-{__version__}-py3-none-any.whl"
    assert dist["sdist"].name == f"fmnist_onnx-{__version__}.tar.gz"
    with zipfile.ZipFile(dist["wheel"]) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {"fmnist_onnx/cli.py", "fmnist_onnx/runtime.py", "fmnist_onnx/classify/engines/ray.py"} <= names
    assert not any(n.startswith("tests/") for n in names)
    assert re.search(r"^fmnist-onnx = fmnist_onnx\.", entry_points, re.M), entry_points
    with tarfile.open(dist["sdist"]) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md", "fmnist_onnx/__init__.py", "fmnist_onnx/cli.py"} <= members

    meta = wheel_metadata(dist["wheel"])
    assert meta["Version"] == __version__
    requires = meta.get_all("Requires-Dist")
    core = {canonical(re.split(r"[ <>=!~\[;]", r)[0]) for r in requires if ";" not in r}
    assert core == CORE  # no torch, and no runtime: [cpu] or [gpu] picks it
    assert {"cpu", "gpu", "train", "test", "ray", "parquet"} <= set(meta.get_all("Provides-Extra"))


@pytest.fixture(scope="module")
def resolver(tmp_path_factory) -> Path:
    """A pip that resolves without downloading (see RESOLVER_PIP), in its own environment."""
    bin_dir = make_venv(tmp_path_factory.mktemp("resolver") / "venv")
    run(bin_dir / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", RESOLVER_PIP)
    return bin_dir


@pytest.mark.slow
@pytest.mark.parametrize(("extras", "present", "absent"), [
    ("cpu", {"onnxruntime", *CORE}, {"onnxruntime-gpu", "torch", "torchvision", "onnx", "matplotlib"}),
    ("gpu", {"onnxruntime-gpu", "nvidia-cuda-runtime", "nvidia-cudnn", "nvidia-cublas", *CORE},
     {"onnxruntime", "torch"}),
    ("train,cpu", {"torch", "torchvision", "onnx", "onnxscript", "matplotlib", "onnxruntime", *CORE},
     {"onnxruntime-gpu"}),
])
def test_each_extra_resolves_to_one_runtime(dist, resolver, tmp_path, extras, present, absent):
    report = tmp_path / "report.json"
    pins = TORCH_PINS if "train" in extras else []
    proc = run(resolver / "python", "-m", "pip", "install", "--disable-pip-version-check", "--dry-run",
               "--ignore-installed", "--use-feature=fast-deps", "--report", report, f"{dist['wheel']}[{extras}]",
               *pins)
    names = {canonical(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    # nvidia-cudnn-cu13 and the like: the CUDA major is part of some names, and moves with onnxruntime-gpu
    found = {p for p in present if p in names or any(n.startswith(p + "-") for n in names)}
    assert found == present, sorted(names)
    assert not absent & names, sorted(names)
    # Metadata only: a downloaded wheel would show as "Downloading x.whl (N MB)", metadata as "x.whl.metadata"
    assert not re.search(r"Downloading \S+\.whl \(", proc.stdout + proc.stderr), proc.stdout[-3000:]


def png_folder(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.new("L", (28, 28), 30 * i).save(folder / f"{i}.png")
    return folder


@pytest.mark.slow
def test_the_wheel_alone_prints_its_version_and_asks_for_a_runtime(dist, onnx_model, tmp_path):
    bin_dir = make_venv(tmp_path / "venv")
    run(bin_dir / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", dist["wheel"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # cwd elsewhere than the checkout: what runs is the installed package, not this tree
    version = run(bin_dir / "fmnist-onnx", "--version", cwd=tmp_path, env=env)
    assert version.stdout.strip() == f"fmnist-onnx, version {__version__}"
    where = run(bin_dir / "python", "-c", "import fmnist_onnx, importlib.metadata as m; "
                "print(fmnist_onnx.__file__); print(m.version('fmnist-onnx'))", cwd=tmp_path, env=env)
    location, installed = where.stdout.split()
    assert location.startswith(str(tmp_path / "venv")) and installed == __version__
    for command in (["info", onnx_model], ["classify", png_folder(tmp_path / "pngs", 2), "-m", onnx_model]):
        proc = subprocess.run([bin_dir / "fmnist-onnx", *map(str, command)], capture_output=True, text=True,
                              cwd=tmp_path, env=env)
        assert_one_line_error(proc, 2, 'onnxruntime is not installed: pip install "fmnist-onnx[cpu]"')
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_both_runtimes_installed_is_one_line_with_the_fix(onnx_model, tmp_path):
    # onnxruntime-gpu is 256 MB and its CUDA libraries 1.3 GB more, to install beside onnxruntime only to be
    # detected: the check reads the distributions' metadata, so the metadata that pip installs is enough.
    extra = tmp_path / "site"
    info = extra / "onnxruntime_gpu-1.31.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n")
    env = {**os.environ, "PYTHONPATH": str(extra)}
    pngs = png_folder(tmp_path / "pngs", 8)
    for command in (["info", onnx_model],
                    ["classify", pngs, "-m", onnx_model, "-o", tmp_path / "out.csv", "--workers", "2"]):
        proc = subprocess.run([sys.executable, "-m", "fmnist_onnx", *map(str, command)], capture_output=True,
                              text=True, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if "onnxruntime-gpu" in line]
        assert len(lines) == 1 and lines[0].endswith(BOTH_RUNTIMES_FIX), proc.stderr  # not once per worker
    proc = subprocess.run([sys.executable, "-m", "fmnist_onnx", "info", str(onnx_model)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0 and "onnxruntime-gpu" not in proc.stderr, proc.stderr
