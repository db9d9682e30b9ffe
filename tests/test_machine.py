"""machine.py: the facts recorded beside every measured figure, read from this machine without heavy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from fmnist_onnx import __version__
from fmnist_onnx.machine import (
    LIBRARIES,
    SIMD_FLAGS,
    busy_between,
    busy_line,
    cpu_times,
    library_versions,
    machine_info,
    usable_cores,
)


def test_library_versions_name_this_package_python_and_the_installed_libraries():
    versions = library_versions()
    assert versions["fmnist_onnx"] == __version__
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"numpy", "onnxruntime"} <= set(versions) <= {"fmnist_onnx", "python", *LIBRARIES}


def test_library_versions_import_none_of_the_libraries():
    code = ("import sys; from fmnist_onnx.machine import library_versions; v = library_versions(); "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_library_versions_are_the_same_whatever_was_imported():
    """Two files of one export (fp32 before torchvision is imported, int8 after) once named two torchvisions."""
    code = ("import json, sys; {}from fmnist_onnx.machine import library_versions; "
            "print(json.dumps(library_versions()))")
    runs = [subprocess.run([sys.executable, "-c", code.format(imports)], capture_output=True, text=True, check=True)
            for imports in ("", "import torch, torchvision; ")]
    bare, imported = (json.loads(r.stdout) for r in runs)
    assert bare == imported and "torchvision" in bare


def test_machine_info_is_json_and_within_this_machine():
    info = machine_info()
    assert json.loads(json.dumps(info)) == info
    assert 1 <= info["usable_cores"] == usable_cores() <= info["cores"] == os.cpu_count()
    assert set(info["cpu_flags"]) <= set(SIMD_FLAGS) and "CPUExecutionProvider" in info["providers"]
    assert info["memory_gib"] > 0 and info["cpu"]


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat (fields 14 and 15, after the name in parentheses)."""
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc/stat here")
def test_busy_counts_the_cpu_another_process_used_not_this_ones():
    """A spinning child on this process's cores: the CPU time other processes used between two readings is at
    least what the child used (read from its own /proc entry, so a machine busy with more work passes too),
    and this process's own spinning is left out of it."""
    cores = {min(os.sched_getaffinity(0))}
    child = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        os.sched_setaffinity(child.pid, cores)
        before, child_before = cpu_times(cores), _cpu_s(child.pid)
        while _cpu_s(child.pid) - child_before < 0.5:  # CPU time, not a clock: as long as the child needs
            time.sleep(0.05)
        after, child_used = cpu_times(cores), _cpu_s(child.pid) - child_before
    finally:
        child.kill()
        child.wait()
    busy = busy_between(before, after)
    other_s = busy["other_cpu_pct"] / 100 * (after.total_s - before.total_s)
    assert other_s >= child_used - 0.05, (busy, child_used)  # jiffies: 10 ms each, two readings
    assert 0 <= busy["steal_pct"] <= 100 and busy["cores"] == 1

    before = cpu_times()
    end = time.process_time() + 0.3
    while time.process_time() < end:  # this process spins: its own CPU time, counted as its own
        pass
    after = cpu_times()
    assert after.own_s - before.own_s >= 0.3 - 0.02


def test_busy_line_names_the_cores_others_used():
    quiet = {"other_cpu_pct": 2.0, "other_cores": 0.04, "steal_pct": 0.0, "cores": 2, "seconds": 10.0, "busy": False}
    assert busy_line(quiet) is None and busy_line(None) is None
    busy = {**quiet, "other_cpu_pct": 85.0, "other_cores": 1.7, "steal_pct": 6.0, "busy": True}
    assert busy_line(busy) == ("note: the machine was busy: other processes used 1.7 of 2 cores during the "
                               "measurement, and the hypervisor took 6% of their time (steal); figures are lower "
                               "than on a quiet machine")
