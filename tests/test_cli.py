"""The command line as a whole: help, speed of --help, the README/CI contract."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, run_cli


def test_help_lists_commands():
    proc = run_cli("--help", check=True)
    assert "train" in proc.stdout


def test_help_does_not_import_torch():
    # --help must stay well under a second: no heavy import at module level.
    code = "import sys; from fmnist_onnx import cli; print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_every_command_has_examples():
    from fmnist_onnx.cli import cli

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            yield prefix + [name], cmd
            if hasattr(cmd, "commands"):
                yield from walk(cmd, prefix + [name])

    for path, cmd in walk(cli, []):
        if hasattr(cmd, "commands") and not cmd.invoke_without_command:
            continue
        proc = run_cli(*path, "--help", check=True)
        assert "Examples:" in proc.stdout, path


def test_unknown_option_is_a_usage_error():
    proc = run_cli("train", "--no-such-option")
    assert proc.returncode == 2 and "No such option" in proc.stderr


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert ci_lines and all(line in readme for line in ci_lines), ci_lines
