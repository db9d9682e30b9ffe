"""The command line as a whole: help, speed of --help, the README/CI contract, the --provider choice lists, and
nothing written outside the outputs asked for (the home folder, onnxruntime's telemetry)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import click
import pytest

from fmnist_onnx.runtime import PROVIDER_CHOICES, PROVIDER_TABLE
from harness import REPO, assert_one_line_error, run_cli


def _commands(group: click.Group, prefix: list[str]):
    for name, cmd in group.commands.items():
        yield prefix + [name], cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + [name])


def _parse_example(line: str) -> None:
    """Parse one `fmnist-onnx ...` example line as the CLI would (no command runs): an unknown command, an
    option that does not exist or a value it refuses raises click's error."""
    from fmnist_onnx.cli import cli

    words = shlex.split(line.split("#")[0].split("|")[0].split(">")[0])
    assert words[0] == "fmnist-onnx", line
    cmd, ctx, args = cli, click.Context(cli, info_name="fmnist-onnx"), words[1:]
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        sub = cmd.get_command(ctx, args[0])
        assert sub is not None, f"{line}: no command {args[0]!r}"
        if isinstance(sub, click.Group) and len(args) > 1 and not args[1].startswith("-"):
            ctx, cmd, args = click.Context(sub, info_name=args[0], parent=ctx), sub, args[1:]
            continue
        cmd, args = sub, args[1:]
        break
    with cmd.make_context(cmd.name, args, parent=ctx):
        pass


def test_every_example_in_the_help_parses():
    """The examples in --help (the top-level flow, each command's Examples:) name commands and options that
    exist, with values they take: help that drifts from the options fails here."""
    from fmnist_onnx.cli import cli

    examples = []
    for path in [[]] + [p for p, _ in _commands(cli, [])]:
        text = run_cli(*path, "--help", check=True).stdout
        examples += [line.strip() for line in text.splitlines() if line.strip().startswith("fmnist-onnx ")]
    assert len(examples) >= 20, examples
    for line in examples:
        _parse_example(line)


def test_help_does_not_import_torch():
    # --help must stay well under a second: no heavy import at module level.
    code = "import sys; from fmnist_onnx import cli; print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_every_command_has_examples():
    from fmnist_onnx.cli import cli

    for path, cmd in _commands(cli, []):
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


def test_every_provider_choice_list_is_the_tables():
    import click

    from fmnist_onnx.cli import cli

    def options(cmd, path=()):
        for p in cmd.params:
            if isinstance(p, click.Option) and "--provider" in p.opts:
                yield (*path, cmd.name), p
        for sub in getattr(cmd, "commands", {}).values():
            yield from options(sub, (*path, cmd.name))

    found = list(options(cli))
    assert {"/".join(where[1:]) for where, _ in found} >= {"verify", "export", "classify", "bench", "bench/classify"}
    for where, opt in found:
        assert tuple(opt.type.choices) == PROVIDER_CHOICES, where
    assert PROVIDER_CHOICES == ("auto", *PROVIDER_TABLE)


def _no_cache_env(home) -> dict:
    """This environment with an empty ``home`` as HOME and no XDG_CACHE_HOME (the suite sets one): any cache a
    command writes lands in ``home``; no ORT_DISABLE_TELEMETRY but what the package sets, and no CI (onnxruntime
    1.32 starts no telemetry at all when CI is set, which would hide what the package does)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("XDG_") and k not in ("ORT_DISABLE_TELEMETRY", "CI")}
    return {**env, "HOME": str(home)}


def test_commands_that_load_onnxruntime_write_nothing_into_home(onnx_model, weights, test_pngs, tmp_path):
    from fmnist_onnx.data import find_root

    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    data = {"FMNIST_DATA": str(find_root())}  # the suite's unpacked copy, read in place: no dataset cache written
    runs = [["info", onnx_model],
            ["classify", test_pngs / "Bag", "-m", onnx_model, "-o", out / "p.csv", "--workers", "1", "-q"],
            ["report", out / "p.csv", "-m", onnx_model],
            ["verify", "--weights", weights, "-m", onnx_model, "--samples", "50", "--provider", "cpu"],
            ["bench", "-m", onnx_model, "--batch-sizes", "1", "--duration", "0.05", "--provider", "cpu", "-q",
             "--json", out / "b.json"]]
    for args in runs:
        proc = run_cli(*args, env=_no_cache_env(home) | data, cwd=out)
        assert proc.returncode == 0, (args, proc.stderr)
        assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == [], args


TASKS = """
import os
import numpy  # its threads (OpenBLAS) before the count
import fmnist_onnx
before = len(os.listdir("/proc/self/task"))
import onnxruntime
print(before, len(os.listdir("/proc/self/task")))
"""


def test_importing_onnxruntime_after_the_package_starts_no_telemetry_unless_the_user_asks(tmp_path):
    """No thread and no file of onnxruntime's telemetry; a user's own ORT_DISABLE_TELEMETRY=0 turns it back on
    (which shows the count sees the thread)."""
    counts = {}
    for user in (None, "0"):
        home = tmp_path / f"home-{user}"
        home.mkdir()
        env = _no_cache_env(home) | ({"ORT_DISABLE_TELEMETRY": user} if user else {})
        proc = subprocess.run([sys.executable, "-c", TASKS], env=env, capture_output=True, text=True, check=True)
        counts[user] = list(map(int, proc.stdout.split()))
        counts[user].append(len(list(home.rglob("*"))))
    assert counts[None][0] == counts[None][1] and counts[None][2] == 0, counts
    assert counts["0"][1] > counts["0"][0] and counts["0"][2] > 0, counts


# Runs the CLI as fmnist-onnx does, hiding the modules named in $HIDE (as if not installed), and says at exit
# which heavy libraries were imported: a usage error must come before them (seconds of imports, then a refusal).
HEAVY = ("torch", "torchvision", "onnxruntime", "onnx", "pyarrow")
TRACED = ("import atexit, os, sys\n"
          "for m in os.environ.get('HIDE', '').split(): sys.modules[m] = None\n"
          f"atexit.register(lambda: print('imported:', [m for m in {HEAVY!r} if sys.modules.get(m)],\n"
          "                               file=sys.stderr))\n"
          "from fmnist_onnx.cli import main; sys.argv[0] = 'fmnist-onnx'; main()")


@pytest.mark.parametrize(("args", "says", "hide"), [
    (["train", "--data-dir", "nowhere", "--out-dir", "out"], "Fashion-MNIST not found", ""),
    (["train", "--resume", "--out-dir", "out"], "--resume: no checkpoint at out/checkpoint.pt", ""),
    (["verify", "--model", "nope.onnx", "--json", "out/v.json"], "model file not found: nope.onnx", ""),
    (["verify", "--model", "m.onnx", "--weights", "nope.pth"], "weights file not found: nope.pth", ""),
    (["verify", "--model", "m.onnx", "--weights", "m.pth", "--data-dir", "nowhere"], "not found", ""),
    (["export", "--weights", "nope.pth", "--output", "out/model.onnx"], "weights file not found", ""),
    (["export", "--weights", "m.pth", "--output", "out/model.onnx", "--data-dir", "nowhere"], "not found", ""),
    (["data", "export-png", "--out", "out", "--data-dir", "nowhere"], "Fashion-MNIST not found", ""),
    (["data", "export-png", "--out", "out", "--format", "parquet"], "--format parquet needs pyarrow", "pyarrow"),
    (["data", "export-png", "--out", "full"], "full is not empty", ""),
])
def test_usage_errors_come_before_the_heavy_imports_and_any_folder(args, says, hide, tmp_path):
    """One line, exit 2, nothing imported that takes seconds, no --out-dir/--output folder left behind."""
    (tmp_path / "m.onnx").write_bytes(b"")  # inputs that exist (they are never read: the error comes first)
    (tmp_path / "m.pth").write_bytes(b"")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.png").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-c", TRACED, *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HIDE": hide})
    assert_one_line_error(proc, 2, says)
    assert "imported: []" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["export", "verify", "data export-png"])
def test_long_commands_say_what_they_do_before_the_heavy_imports(command, weights, onnx_model, tmp_path):
    """A first line on stderr before torch is imported (its import alone takes seconds), stage lines after it;
    --quiet: none. The order is read from the same stream: -X importtime writes each import as it ends (a
    module of torch's before torch itself)."""
    args = {"export": ["export", "--weights", weights, "--output", tmp_path / "m.onnx", "--overwrite"],
            "verify": ["verify", "--weights", weights, "-m", onnx_model, "--samples", "100", "--provider", "cpu"],
            "data export-png": ["data", "export-png", "--out", tmp_path / "png", "--limit", "10", "--overwrite"],
            }[command]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "fmnist_onnx", *map(str, args)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith(f"{command}: ")]
    heavy = next(i for i, line in enumerate(lines) if re.search(r"\|\s+(torch|torchvision|onnx|onnxruntime)(\.|$)",
                                                                 line))
    assert said and said[0] < heavy, (lines[heavy], [lines[i] for i in said])
    if command != "data export-png":  # and lines for its stages (export-png's: the bar's lines)
        assert len(said) >= 2, [lines[i] for i in said]
    quiet = run_cli(*args, "--quiet")
    assert quiet.returncode == 0 and f"{command}: " not in quiet.stderr, quiet.stderr
