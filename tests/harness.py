"""What the tests share that is not a fixture: running the CLI as a real process (or in this one, for refusals),
processes held at a pause point (fmnist_onnx/testing.py), waiting for processes to exit, running as an
unprivileged user, and hand-made ONNX models. The fixtures are in conftest.py."""

from __future__ import annotations

import os
import pwd
import selectors
import signal
import site
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fmnist_onnx.testing import FD_ENV, PAUSE_ENV

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m fmnist_onnx ARGS`` as a real process; stdout and stderr captured as text."""
    proc = subprocess.run([sys.executable, "-m", "fmnist_onnx", *map(str, args)], capture_output=True, text=True,
                          **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def cli_run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """The same command run in this process (click's CliRunner), with run_cli's result: for what a command checks
    and refuses before its work, where a process of its own adds nothing but seconds of imports. Signals, kills,
    the entry point's exit codes and a clean environment need run_cli's real process."""
    import logging

    from click.testing import CliRunner

    from fmnist_onnx.cli import cli

    logging.root.handlers.clear()  # the command's basicConfig then logs to this run's stderr, not a closed one
    res = CliRunner().invoke(cli, [str(a) for a in args], prog_name="fmnist-onnx", catch_exceptions=False)
    if check and res.exit_code != 0:
        raise AssertionError(f"exit {res.exit_code}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return subprocess.CompletedProcess(["fmnist-onnx", *map(str, args)], res.exit_code, res.stdout, res.stderr)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int = 2, contains: str = "") -> None:
    """The CLI's contract for user mistakes: exit ``code``, an 'Error:' line naming the problem, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Error" in proc.stderr, proc.stderr
    if contains:
        assert contains in proc.stderr, proc.stderr


def foreign_model(path: Path, input_shape: list, outputs: int, classes: int) -> Path:
    """A valid ONNX classifier that is not this one: another input shape, or several outputs."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    features = int(np.prod(input_shape[1:]))
    w = numpy_helper.from_array(np.zeros((features, classes), np.float32), "w")
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["out0"])]
    nodes += [helper.make_node("Identity", ["out0"], [f"out{i}"]) for i in range(1, outputs)]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)]
    outs = [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, ["batch", classes]) for i in range(outputs)]
    graph = helper.make_graph(nodes, "foreign", inputs, outs, initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


def save_classifier(path: Path, name: str, nodes: list, initializers: list) -> Path:
    """An ONNX model of this project's signature (``input`` [batch, 1, 28, 28] -> ``logits`` [batch, 10]) made of
    ``nodes``: a model that misbehaves on purpose (NaN logits, a huge allocation)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, name,
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


class FakeClock:
    """Time that moves only when the code under test "works": a test advances it, the harness reads it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------------------------------------- held processes

class Held:
    """A real process held at a pause point of fmnist_onnx/testing.py, so that a test acts on it at a known
    moment instead of racing it: ``wait()`` returns once the process is held there (it blocks on a socket: no
    polling), the test does its deed (a signal, a kill), ``release()`` lets the process go on. As a context
    manager, whatever is still running at the end is killed (its whole process group with start_new_session)."""

    def __init__(self, cmd: list[str], point: str, env: dict | None = None, **popen) -> None:
        self.point = point
        self._ours, theirs = socket.socketpair()
        env = {**(os.environ if env is None else env), PAUSE_ENV: point, FD_ENV: str(theirs.fileno())}
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # pytest started in a background job (`cmd &`, nohup): the shell ignores Ctrl-C there, and the run
            # would inherit that and rightly keep it. The tests mean a run in a terminal, where Ctrl-C counts.
            popen.setdefault("preexec_fn", _ctrl_c_counts)
        self.proc = subprocess.Popen(cmd, env=env, pass_fds=(theirs.fileno(),), **popen)
        self._group = popen.get("start_new_session", False)
        theirs.close()

    def wait(self, timeout: float = 300) -> int:
        """Block until the process is held at its point; returns its pid. It must not exit before (the
        timeout is only a safety net for a hung run)."""
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._ours, selectors.EVENT_READ)
            pidfd = _pidfd(self.proc.pid)
            if pidfd is not None:
                sel.register(pidfd, selectors.EVENT_READ)
            try:
                deadline = time.monotonic() + timeout
                while not buf.endswith(b"\n"):
                    ready = {key.fileobj for key, _ in sel.select(max(0.0, deadline - time.monotonic()))}
                    if self._ours in ready:
                        data = self._ours.recv(256)
                        buf += data
                        if data:
                            continue
                    if not ready:
                        raise AssertionError(f"not held at {self.point} after {timeout} s")
                    code = self.proc.wait(timeout)
                    raise AssertionError(f"the process exited ({code}) before {self.point}: nothing was tested\n"
                                         f"{_stderr_of(self.proc)}")
            finally:
                if pidfd is not None:
                    os.close(pidfd)
        where, pid = buf.decode().split()
        assert where == self.point and int(pid) == self.proc.pid, buf
        return self.proc.pid

    def release(self) -> None:
        self._ours.close()  # the process reads the end of the socket: it goes on (never blocks here)

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        if self.proc.poll() is None:
            try:
                (os.killpg if self._group else os.kill)(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(60)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _ctrl_c_counts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stderr_of(proc: subprocess.Popen) -> str:
    """What the process wrote to its stderr pipe so far (not waiting for children that may hold it open)."""
    if proc.stderr is None or proc.stderr.closed:
        return ""
    os.set_blocking(proc.stderr.fileno(), False)
    try:
        return os.read(proc.stderr.fileno(), 1 << 16).decode(errors="replace")
    except BlockingIOError:
        return ""


def _pidfd(pid: int) -> int | None:
    """A file descriptor that becomes readable when ``pid`` exits (Linux 5.3+); None if it is gone already or
    the platform has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def wait_for_exit(pids, timeout: float = 60) -> list[int]:
    """Block until every process of ``pids`` has exited (a zombie has: it only waits for its parent), watching
    pidfds rather than polling. Returns those still alive when ``timeout`` (a safety net) runs out."""
    fds = {fd: pid for pid in pids if (fd := _pidfd(pid)) is not None}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            ready = sel.select(max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for key, _ in ready:
                sel.unregister(key.fileobj)
        left = [fds[fd] for fd in sel.get_map()]
    for fd in fds:
        os.close(fd)
    return left


# ---------------------------------------------------------------------------------------------- unprivileged

class Unprivileged:
    """Runs commands as the user `nobody` when the tests run as root (as in CI), else as the current user: for
    the tests of unreadable files, which mean nothing to root (it reads any file). ``folder`` is a fresh folder
    under /tmp that this user may write."""

    # The lock that concurrent test sessions share: the temporary folder itself (flock works on a folder), so
    # that no lock file is left behind in it.
    LOCK = Path(tempfile.gettempdir())

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="nobody", dir="/tmp"))
        self.kwargs: dict = {}
        if os.geteuid() == 0:
            user = pwd.getpwnam("nobody")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "HOME"))}
            env.update(HOME=str(self.folder), XDG_CACHE_HOME=str(self.folder / ".cache"))
            self.kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "env": env,
                           "cwd": self.folder}

    def run(self, cmd: list, **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run(cmd)`` as this user, output captured as text. As root: the folders on the way to the
        interpreter, the venv and this checkout that others may not search (/root is 0700; CI runs from a
        clone) get the search bit (o+x, never read) for the run alone, under a lock that concurrent test
        sessions share, and their mode back after it."""
        if not self.kwargs:
            return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, **kwargs)
        import fcntl

        lock = os.open(self.LOCK, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            changed: dict[Path, int] = {}
            try:
                for target in {Path(sys.executable).resolve(), Path(sys.prefix), Path(sys.base_prefix), REPO,
                               *map(Path, site.getsitepackages()), self.folder}:
                    if not target.exists():  # site.getsitepackages() names folders that may not exist
                        continue
                    for d in [target, *target.parents] if target.is_dir() else target.parents:
                        mode = stat.S_IMODE(d.stat().st_mode)
                        if not mode & stat.S_IXOTH and d not in changed:
                            changed[d] = mode
                            d.chmod(mode | stat.S_IXOTH)
                return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, **self.kwargs, **kwargs)
            finally:
                for d, mode in changed.items():
                    d.chmod(mode)
        finally:
            os.close(lock)  # and with it the lock

    def run_cli(self, *args) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "fmnist_onnx", *args])


def assert_report_draws(table: Path, page: Path) -> None:
    """`fmnist-onnx report` of ``table`` draws its images (read again from wherever the rows name them)."""
    proc = run_cli("report", table, "-o", page)
    assert proc.returncode == 0, proc.stderr
    text = page.read_text()
    assert "cannot read it now" not in text and text.count("data:image/png") > 20
