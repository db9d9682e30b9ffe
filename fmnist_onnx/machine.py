"""What a measured figure needs beside it to mean anything: the CPU, cores, memory, GPUs and library versions.

Nothing heavy is imported here (no torch, no onnx): train, export, bench and the benchmarks all record these
facts, and bench runs where only onnxruntime and numpy are installed.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fmnist_onnx import __version__
from fmnist_onnx.runtime import usable_cores  # noqa: F401 - where the figures' callers have always found it

# Every library that a figure or a model file may depend on; the ones not installed are left out.
LIBRARIES = ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript", "torch", "torchvision", "pillow")
# The instruction sets that decide the fp32 and int8 figures (VNNI: fast int8 dot products; AMX: tiles).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def library_versions() -> dict[str, str]:
    """fmnist_onnx, Python and each installed library of LIBRARIES, importing none of them, and the same
    whatever this process has imported (two files of one export name one version per library): the
    package's own ``version.py`` where it has one (the precise one: PyPI's torch 2.14.1 says 2.14.1+cu130
    there), else the installed distribution's."""
    out = {"fmnist_onnx": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        found = _version_file(name)
        if found is None:
            try:
                found = version(name)
            except PackageNotFoundError:
                continue
        out[name] = found
    return out


def _version_file(name: str) -> str | None:
    """``__version__ = '...'`` in the package ``name``'s version.py, read as text (torch and torchvision write
    their build there: +cu130, +cpu); None where there is no such line."""
    from importlib.util import find_spec

    try:
        spec = find_spec(name)  # a top-level name: found, not imported
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(folder) / "version.py").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if m := re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", text, re.MULTILINE):
            return m.group(1)
    return None


def cpu_name_and_flags() -> tuple[str, set[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if flags and name:
                break
    except OSError:
        pass
    return name, flags


def gpu_names() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine_info() -> dict:
    """CPU, cores, memory, SIMD flags, GPUs, library versions, onnxruntime's providers and the load average."""
    from fmnist_onnx.runtime import available_providers

    cpu, flags = cpu_name_and_flags()
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    try:  # other work on the same cores skews every figure: say how busy the machine was
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable_cores(), "memory_gib": memory_gib,
            "cpu_flags": [f for f in SIMD_FLAGS if f in flags], "gpus": gpu_names(), "platform": platform.platform(),
            "versions": library_versions(), "providers": available_providers(), "load_average": load,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
