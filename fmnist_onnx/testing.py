"""Pause points: a run held at a named moment, so that a test can act on it there (kill it, interrupt it, kill
one of its workers) without racing it. Outside tests nothing is set and a pause point returns at once.

A test sets two environment variables for the process it starts (tests/harness.py, ``Held``, is that side):

  FMNIST_ONNX_PAUSE=NAME[:N]   hold at the N-th pass (default 1) of the pause point NAME:
      main.started             the command line's process, Ctrl-C's and SIGTERM's handler set, nothing imported yet
      classify.before_engine   the request is checked; the engine (workers, onnxruntime, Ray) is not started
      classify.engine_ready    the engine is started; no journal yet
      classify.after_chunk     a chunk of rows has been appended to the journal, with either engine (the rows
                               are in the file, not necessarily on the disk)
      train.after_step         an optimizer step is done (train.py; counted from this process's start, across
                               epochs), before the loop looks for a Ctrl-C
  FMNIST_ONNX_PAUSE_FD=FD      this process's end of a socket pair (or pipe) that the test passed it

On the N-th pass the process writes one line, ``NAME:N PID``, to FD and then reads FD until the test writes a
byte or closes its end: the release. While it is held the test acts: SIGKILL kills it there; a signal whose
handler raises (Ctrl-C, and SIGTERM in classify) ends the wait with that exception, as it would have ended the
work at that point; a signal whose handler only takes note (train's) is seen once the test releases the run.
Why a socket (or pipe) and not a named file: the test waits for the line without polling, and its release never
blocks, even when the process is gone. The environment is read once, at import.

A crash point makes a process die as a decoder crash (or the OOM killer) would have killed it, on a file the
test names, so that a test sees what a run does then with a real process death:

  FMNIST_ONNX_DIE_ON=SUFFIX    the process that is about to decode a chunk with a file (or a container's image)
                               whose path ends with SUFFIX SIGKILLs itself: a local decoding worker
                               (engines/local.py), or a Ray actor (engines/ray.py, which passes the variable to
                               its actors: on a cluster they do not inherit the driver's environment)
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

PAUSE_ENV = "FMNIST_ONNX_PAUSE"
FD_ENV = "FMNIST_ONNX_PAUSE_FD"
DIE_ON_ENV = "FMNIST_ONNX_DIE_ON"

# The pause points' names, for the code that passes them and the tests that hold a run there (see above)
MAIN_STARTED = "main.started"
CLASSIFY_BEFORE_ENGINE = "classify.before_engine"
CLASSIFY_ENGINE_READY = "classify.engine_ready"
CLASSIFY_AFTER_CHUNK = "classify.after_chunk"
TRAIN_AFTER_STEP = "train.after_step"


def _parse(spec: str) -> tuple[str | None, int]:
    if not spec:
        return None, 0
    name, _, n = spec.partition(":")
    if not name or (n and not n.isdigit()) or n == "0":
        raise ValueError(f"{PAUSE_ENV}={spec!r}: expected NAME or NAME:N (N >= 1)")
    return name, int(n or 1)


_POINT, _AT = _parse(os.environ.get(PAUSE_ENV, ""))
_passes = 0
_DIE_ON = os.environ.get(DIE_ON_ENV, "")


def pause_point(name: str) -> None:
    """Hold here if FMNIST_ONNX_PAUSE names this point and this is its N-th pass (see the module doc)."""
    global _passes
    if name != _POINT:
        return
    _passes += 1
    if _passes == _AT:
        _hold(f"{name}:{_passes}")


def _hold(where: str) -> None:
    import select

    fd = int(os.environ[FD_ENV])
    # A signal may come as soon as the line is out, before this process blocks: with a plain read(2) its handler
    # would then wait for the release. The wake-up pipe (Python's C-level handler writes each signal's number to
    # it) turns such a signal into an event the wait below sees, whenever it came.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    try:
        old = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: Python's handlers run in the main thread alone anyway
        old = None
    try:
        os.write(fd, f"{where} {os.getpid()}\n".encode())
        while True:
            ready = select.select([fd, wake_r], [], [])[0]
            if fd in ready:
                os.read(fd, 1)  # the test's byte, or the end of its socket: released
                return
            os.read(wake_r, 256)  # a signal whose handler did not raise (it took note): held still
    finally:
        if old is not None:
            signal.set_wakeup_fd(old)
        os.close(wake_r)
        os.close(wake_w)


def crash_point(paths: Sequence[str]) -> None:
    """Die here, killed as by a crash (SIGKILL: nothing runs after it), if FMNIST_ONNX_DIE_ON is set and one of
    ``paths`` ends with it (see the module doc)."""
    if _DIE_ON and any(p.endswith(_DIE_ON) for p in paths):
        os.kill(os.getpid(), signal.SIGKILL)


def crash_env() -> dict[str, str]:
    """The crash point's variable, where it is set, for processes that do not inherit this one's environment
    (Ray actors on a cluster): empty outside tests."""
    return {DIE_ON_ENV: _DIE_ON} if _DIE_ON else {}
