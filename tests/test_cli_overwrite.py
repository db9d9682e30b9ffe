"""The one write policy, command by command (cli.py): an existing output is replaced only with --overwrite, and
an input is never an output, even with it. Each row is a real command on real files."""

from __future__ import annotations

import os
import shutil

import pytest

from fmnist_onnx.files import lock_path
from harness import assert_one_line_error, cli_run, run_cli

# (name, the output the row writes, the command's arguments once the files are in place: {d} is the folder)
COMMANDS = [
    ("export --json", "e.json", ["export", "--weights", "{d}/model.pth", "-o", "{d}/new.onnx", "--no-verify",
                                 "--json", "{d}/e.json"]),
    ("export -o", "new.onnx", ["export", "--weights", "{d}/model.pth", "-o", "{d}/new.onnx", "--no-verify"]),
    ("verify --json", "v.json", ["verify", "--weights", "{d}/model.pth", "-m", "{d}/model.onnx", "--samples", "50",
                                 "--provider", "cpu", "--json", "{d}/v.json"]),
    # bench's cheapest run that writes the file: onnxruntime fp32 alone (no int8, no torch though model.pth is beside)
    ("bench --json", "b.json", ["bench", "-m", "{d}/model.onnx", "--no-torch", "--no-int8", "--batch-sizes", "1",
                                "--duration", "0.05", "--provider", "cpu", "--json", "{d}/b.json", "-q"]),
    ("bench --plot", "b.png", ["bench", "-m", "{d}/model.onnx", "--no-torch", "--no-int8", "--batch-sizes", "1",
                               "--duration", "0.05", "--provider", "cpu", "--plot", "{d}/b.png", "-q"]),
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
    assert_one_line_error(cli_run("data", "export-png", "--out", out, "--limit", "3"), 2, "--overwrite")
    proc = cli_run("data", "export-png", "--out", out, "--limit", "3", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert len(list(out.rglob("*.png"))) == 3


def test_data_export_png_never_writes_through_a_planted_class_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "pngs"
    out.mkdir()
    (out / "Ankle boot").symlink_to(elsewhere)  # the first test image is an ankle boot
    assert_one_line_error(cli_run("data", "export-png", "--out", out, "--limit", "3", "--overwrite"), 2,
                          "symbolic link")
    assert list(elsewhere.iterdir()) == []


# (name, the output whose lock file <output>.lock is planted, the command's arguments: {d} is the folder)
LOCKED = [
    ("classify", "p.csv", ["classify", "{d}/in", "-m", "{d}/model.onnx", "-o", "{d}/p.csv", "--workers", "1", "-q"]),
    ("classify --report", "r.html", ["classify", "{d}/in", "-m", "{d}/model.onnx", "-o", "{d}/p.csv", "--workers",
                                     "1", "-q", "--report", "{d}/r.html"]),
    ("report", "r.html", ["report", "{d}/table.csv", "-o", "{d}/r.html"]),
    ("data export-png", "pngs", ["data", "export-png", "--out", "{d}/pngs", "--limit", "3", "-q"]),
]


@pytest.mark.parametrize("planted", ["hard link", "FIFO", "other content"])
@pytest.mark.parametrize("name,output,args", LOCKED, ids=[c[0] for c in LOCKED])
def test_a_file_planted_at_the_lock_is_refused_and_left_as_it_is(work, name, output, args, planted):
    """A hard link to the user's file, a FIFO or a file of other content at an output's lock name: one line,
    exit 2, naming it, and not a byte of it (or of the file it shares) changed; no output."""
    from PIL import Image

    (work / "in").mkdir()
    for i in range(3):
        Image.new("L", (28, 28), 40 * i).save(work / "in" / f"{i}.png")
    (work / "table.csv").write_text(f"path,label,index,score,error,true_label\n{work}/in/0.png,,,,cannot read,\n")
    user, lock = work / "notes.txt", lock_path(work / output)
    user.write_text("precious\n")
    {"hard link": lambda: os.link(user, lock), "FIFO": lambda: os.mkfifo(lock),
     "other content": lambda: lock.write_text("precious\n")}[planted]()
    before = sorted(os.listdir(work))
    if planted == "FIFO":  # a run that blocked on it would hang: in a process of its own it fails here instead
        proc = run_cli(*_args(args, work), timeout=300)
    else:  # a refusal before any work: this process does it as well as a new one
        proc = cli_run(*_args(args, work))
    assert_one_line_error(proc, 2, f"{lock} is ")
    assert "not a lock file" in proc.stderr
    assert user.read_text() == "precious\n" and sorted(os.listdir(work)) == before
    assert os.lstat(lock).st_nlink == (2 if planted == "hard link" else 1)
    if planted != "FIFO":
        assert lock.read_text() == "precious\n"
