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
from dataclasses import dataclass
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


# ------------------------------------------------------------------------------------------ how busy it was

BUSY_PCT = 10.0  # other processes' CPU, % of the usable cores, from which a measurement counts as busy
STEAL_PCT = 5.0  # time the hypervisor gave to other machines, % of the usable cores' time, likewise


@dataclass
class CpuTimes:
    """One reading of the CPU time spent on the usable cores (/proc/stat) and by this process (os.times)."""

    busy_s: float  # every process (user, nice, system, irq, softirq), this one included
    steal_s: float  # taken by the hypervisor for other virtual machines
    total_s: float  # all of it, idle included
    own_s: float  # this process: user + system, all its threads
    cores: int  # how many cores were read


def cpu_times(cores: set[int] | None = None) -> CpuTimes | None:
    """The CPU times of the ``cores`` (default: those this process may use) now; None where /proc/stat cannot
    be read (not Linux). Their differences between two readings say how busy the machine was meanwhile."""
    cores = os.sched_getaffinity(0) if cores is None and hasattr(os, "sched_getaffinity") else cores
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    busy = steal = total = count = 0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()) or (cores is not None and int(name[3:]) not in cores):
            continue
        user, nice, system, idle, iowait, irq, softirq, stolen = (list(map(int, fields)) + [0] * 8)[:8]
        busy += user + nice + system + irq + softirq  # guest time is already inside user
        steal += stolen
        total += user + nice + system + idle + iowait + irq + softirq + stolen
        count += 1
    if not total:
        return None
    own = os.times()
    return CpuTimes(busy / tick, steal / tick, total / tick, own.user + own.system, count)


def busy_between(before: CpuTimes | None, after: CpuTimes | None) -> dict | None:
    """How busy the machine was between two readings: the cores other processes used on average (the busy time
    less this process's own), the hypervisor's steal, each as % of the cores' time, and ``busy`` where either
    passes its threshold (BUSY_PCT, STEAL_PCT). None without two readings."""
    if before is None or after is None or not after.total_s > before.total_s:
        return None
    total = after.total_s - before.total_s
    other = max(0.0, (after.busy_s - before.busy_s) - (after.own_s - before.own_s))
    cores = after.cores
    other_pct, steal_pct = 100 * min(other, total) / total, 100 * (after.steal_s - before.steal_s) / total
    return {"other_cpu_pct": round(other_pct, 1), "other_cores": round(other_pct * cores / 100, 2),
            "steal_pct": round(steal_pct, 1), "cores": cores, "seconds": round(total / cores, 1),
            "busy": other_pct >= BUSY_PCT or steal_pct >= STEAL_PCT}


def busy_line(busy: dict | None) -> str | None:
    """The note for a busy measurement, or None where it was quiet (or could not be read)."""
    if not busy or not busy["busy"]:
        return None
    steal = f", and the hypervisor took {busy['steal_pct']:.0f}% of their time (steal)" \
        if busy["steal_pct"] >= STEAL_PCT else ""
    return (f"note: the machine was busy: other processes used {busy['other_cores']:.1f} of {busy['cores']} cores "
            f"during the measurement{steal}; figures are lower than on a quiet machine")
