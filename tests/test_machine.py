"""machine.py: the facts recorded beside every measured figure, read from this machine without heavy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fmnist_onnx import __version__
from fmnist_onnx.machine import LIBRARIES, SIMD_FLAGS, library_versions, machine_info, usable_cores


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
