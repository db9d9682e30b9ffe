"""files.py: the one write policy (no replace without overwrite, atomic, never through a link, never over an
input) and the lock per output, on real files and real processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_onnx.errors import UserError
from fmnist_onnx.files import (
    LockLost,
    OutputLock,
    atomic_write_text,
    check_distinct,
    check_locks,
    check_output,
    lock_path,
)

HOLDER = """
import sys
from fmnist_onnx.files import OutputLock
with OutputLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin, or kills us
"""


def hold_lock(output: Path) -> subprocess.Popen:
    """A real process that holds the lock on ``output`` until its stdin closes; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(output)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_atomic_write_refuses_an_existing_file_without_overwrite(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("mine")
    with pytest.raises(UserError, match="exists; use --overwrite"):
        atomic_write_text(out, "new")
    assert out.read_text() == "mine"
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left


def test_atomic_write_replaces_a_link_not_its_target(tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    atomic_write_text(link, "new", overwrite=True)
    assert victim.read_text() == "precious"
    assert not link.is_symlink() and link.read_text() == "new"


def test_check_output_refuses_an_input_even_with_overwrite(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x")
    alias = tmp_path / "alias.onnx"
    alias.symlink_to(model)
    for name in (model, alias, tmp_path / "." / "model.onnx"):
        with pytest.raises(UserError, match="also an input"):
            check_output(name, overwrite=True, inputs=[model])


def test_check_output_refuses_a_hard_link_to_an_input(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x")
    os.link(model, tmp_path / "twin.onnx")
    with pytest.raises(UserError, match="also an input"):
        check_output(tmp_path / "twin.onnx", overwrite=True, inputs=[model])


def test_check_output_refuses_a_missing_folder_and_a_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_output(tmp_path / "no" / "out.csv", overwrite=False)
    with pytest.raises(UserError, match="is a folder"):
        check_output(tmp_path, overwrite=True)


def test_check_distinct_sees_two_names_for_one_file(tmp_path):
    with pytest.raises(UserError, match="two outputs"):
        check_distinct([tmp_path / "a.png", tmp_path / "sub" / ".." / "a.png"])


def test_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    out = tmp_path / "out.csv"
    holder = hold_lock(out)
    try:
        with pytest.raises(UserError, match=f"process {holder.pid}"):
            OutputLock(out).acquire()
    finally:
        holder.stdin.close()
        holder.wait()
    with OutputLock(out):  # released when the holder ended
        pass
    assert not lock_path(out).exists()


def test_a_killed_holder_frees_the_lock(tmp_path):
    out = tmp_path / "out.csv"
    holder = hold_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(out).exists()  # left behind by the killed process, but no longer held
    with OutputLock(out) as lock:
        assert lock_path(out).read_text() == f"{os.getpid()}\n"
        assert lock.fd >= 0


def test_lock_in_one_process_is_held_once(tmp_path):
    out = tmp_path / "out.csv"
    with OutputLock(out):
        with pytest.raises(UserError, match="being written by another run"):
            OutputLock(out).acquire()


def test_lock_refuses_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    lock_path(tmp_path / "out.csv").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        OutputLock(tmp_path / "out.csv").acquire()
    assert victim.read_text() == "precious"


def _plant(kind: str, lock: Path, user: Path) -> None:
    """Something that is no lock file of this tool at ``lock``: ``user``, a file of the user's, stays as it is."""
    if kind == "hard link":
        os.link(user, lock)
    elif kind == "FIFO":
        os.mkfifo(lock)
    elif kind == "other content":
        lock.write_text("12 and more\n")
    elif kind == "folder":
        lock.mkdir()
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(lock))
        s.close()


@pytest.mark.parametrize(("kind", "said"), [("hard link", "2 names"), ("FIFO", "a FIFO"),
                                            ("other content", "other content"), ("folder", "a folder"),
                                            ("socket", "a socket")])
def test_lock_refuses_and_leaves_anything_but_its_own_file(kind, said, tmp_path):
    out, user = tmp_path / "out.csv", tmp_path / "notes.txt"
    user.write_text("precious\n")
    _plant(kind, lock_path(out), user)
    before = os.lstat(lock_path(out))
    with pytest.raises(UserError, match=f"{re.escape(str(lock_path(out)))} is .*{said}.*not a lock file"):
        OutputLock(out).acquire()  # a FIFO never blocks it: a hang would fail the suite's timeout
    after = os.lstat(lock_path(out))
    assert (after.st_ino, after.st_mode, after.st_nlink, after.st_size) == \
        (before.st_ino, before.st_mode, before.st_nlink, before.st_size)
    assert user.read_text() == "precious\n"
    if kind == "other content":
        assert lock_path(out).read_text() == "12 and more\n"


@pytest.mark.parametrize("left", ["", "4242\n"])
def test_lock_takes_what_a_killed_holder_leaves(left, tmp_path):
    """Empty (killed between creating and writing its id) or a process id: the file is a lock of this tool."""
    out = tmp_path / "out.csv"
    lock_path(out).write_text(left)
    with OutputLock(out):
        assert lock_path(out).read_text() == f"{os.getpid()}\n"
    assert not lock_path(out).exists()


def test_a_lock_removed_under_its_holder_is_noticed_and_the_new_one_left_alone(tmp_path):
    out = tmp_path / "out.csv"
    lock = OutputLock(out)
    lock.acquire()
    lock_path(out).unlink()
    holder = hold_lock(out)  # a second run gets in: it makes a lock file of its own
    try:
        with pytest.raises(LockLost, match="was removed or replaced during this run"):
            lock.check_held()
        with pytest.raises(LockLost):
            atomic_write_text(out, "rows", overwrite=True)  # nothing is published under a lost lock
        assert sorted(p.name for p in tmp_path.iterdir()) == [lock_path(out).name]  # no temporary file left
        lock.release()
        assert lock_path(out).read_text() == f"{holder.pid}\n"  # the other run's lock, not removed
        check_locks()  # this process holds nothing now
    finally:
        holder.stdin.close()
        holder.wait()


def test_a_block_whose_lock_was_removed_ends_with_lock_lost(tmp_path):
    out = tmp_path / "out.csv"
    with pytest.raises(LockLost):
        with OutputLock(out):
            lock_path(out).unlink()
    check_locks()  # released all the same
