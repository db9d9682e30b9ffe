"""The one write policy, command by command (cli.py): an existing output is replaced only with --overwrite, and
an input is never an output, even with it. Each row is a real command on real files."""

from __future__ import annotations

import shutil

import pytest

from harness import assert_one_line_error, run_cli

# (name, the output the row writes, the command's arguments once the files are in place: {d} is the folder)
COMMANDS = [
    ("export --json", "e.json", ["export", "--weights", "{d}/model.pth", "-o", "{d}/new.onnx", "--no-verify",
                                 "--json", "{d}/e.json"]),
    ("export -o", "new.onnx", ["export", "--weights", "{d}/model.pth", "-o", "{d}/new.onnx", "--no-verify"]),
    ("verify --json", "v.json", ["verify", "--weights", "{d}/model.pth", "-m", "{d}/model.onnx", "--samples", "50",
                                 "--provider", "cpu", "--json", "{d}/v.json"]),
    ("bench --json", "b.json", ["bench", "-m", "{d}/model.onnx", "--weights", "{d}/model.pth", "--batch-sizes", "1",
                                "--duration", "0.05", "--provider", "cpu", "--json", "{d}/b.json", "-q"]),
    ("bench --plot", "b.png", ["bench", "-m", "{d}/model.onnx", "--batch-sizes", "1", "--duration", "0.05",
                               "--provider", "cpu", "--plot", "{d}/b.png", "-q"]),
]

# (name, the input that the command is asked to write over, its arguments)
INPUTS_AS_OUTPUTS = [
    ("export -o the weights", "model.pth", ["export", "--weights", "{d}/model.pth", "-o", "{d}/model.pth",
                                            "--no-verify"]),
    ("export --json the weights", "model.pth", ["export", "--weights", "{d}/model.pth", "-o", "{d}/n.onnx",
                                                "--json", "{d}/model.pth"]),
    ("verify --json the model", "model.onnx", ["verify", "--weights", "{d}/model.pth", "-m", "{d}/model.onnx",
                                               "--json", "{d}/model.onnx"]),
    ("bench --plot the model", "model.onnx", ["bench", "-m", "{d}/model.onnx", "--plot", "{d}/model.onnx"]),
    ("bench --json the weights", "model.pth", ["bench", "-m", "{d}/model.onnx", "--weights", "{d}/model.pth",
                                               "--json", "{d}/model.pth"]),
]


@pytest.fixture
def work(tmp_path, weights, onnx_model):
    shutil.copy(weights, tmp_path / "model.pth")
    shutil.copy(onnx_model, tmp_path / "model.onnx")
    return tmp_path


def _args(args: list[str], d) -> list[str]:
    return [a.format(d=d) for a in args]


@pytest.mark.parametrize("name,output,args", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_an_existing_output_needs_overwrite(work, name, output, args):
    (work / output).write_bytes(b"the user's")
    assert_one_line_error(run_cli(*_args(args, work)), 2, "use --overwrite")
    assert (work / output).read_bytes() == b"the user's"
    assert sorted(p.name for p in work.iterdir()) == sorted({"model.pth", "model.onnx", output})  # no leftovers
    proc = run_cli(*_args(args, work), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (work / output).read_bytes() != b"the user's"


@pytest.mark.parametrize("name,output,args", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_linked_output_is_replaced_not_its_target(work, tmp_path_factory, name, output, args):
    victim = tmp_path_factory.mktemp("elsewhere") / "notes.txt"
    victim.write_bytes(b"precious")
    (work / output).symlink_to(victim)
    proc = run_cli(*_args(args, work), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert victim.read_bytes() == b"precious"
    assert not (work / output).is_symlink()


@pytest.mark.parametrize("name,victim,args", INPUTS_AS_OUTPUTS, ids=[c[0] for c in INPUTS_AS_OUTPUTS])
def test_an_input_is_never_an_output(work, name, victim, args):
    before = (work / victim).read_bytes()
    assert_one_line_error(run_cli(*_args(args, work), "--overwrite"), 2, "also an input")
    assert (work / victim).read_bytes() == before


def test_data_export_png_writes_into_a_folder_only_with_overwrite(tmp_path):
    out = tmp_path / "pngs"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli("data", "export-png", "--out", out, "--limit", "3"), 2, "--overwrite")
    proc = run_cli("data", "export-png", "--out", out, "--limit", "3", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert len(list(out.rglob("*.png"))) == 3


def test_data_export_png_never_writes_through_a_planted_class_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "pngs"
    out.mkdir()
    (out / "Ankle boot").symlink_to(elsewhere)  # the first test image is an ankle boot
    assert_one_line_error(run_cli("data", "export-png", "--out", out, "--limit", "3", "--overwrite"), 2,
                          "symbolic link")
    assert list(elsewhere.iterdir()) == []
