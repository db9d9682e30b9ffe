"""The exceptions that end a command with one line on stderr instead of a traceback, and Ctrl-C's first handler.

An exception's exit code is a property of its type (click's ``ClickException.exit_code``): the CLI
(``cli._Group.invoke``) prints ``e.line()`` and exits with ``e.exit_code``, in that one place; no command picks
a number. The codes:

  1      CheckFailed            a check the command exists to make did not pass (verify; export's parity, int8)
  2      UserError              a mistake the user can fix (missing file, wrong model, bad option value)
  3      -                      classify finished, but some files failed (rows with an error): not an exception
  4      files.OutputError      classify's output could not be written mid-run (the journal keeps the rows)
  5      runtime.ModelRunError  the model failed mid-run (onnxruntime out of memory; the journal keeps the rows)
  128+N  Interrupted            stopped by signal N after saving what can be resumed (130: Ctrl-C, 143: SIGTERM)

This module imports nothing at the top: ``__main__`` imports it before anything else (see
``exit_at_once_on_signals``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


class CommandExit(Exception):
    """An exception that ends a command with ``line()`` on stderr and ``exit_code``, never a traceback."""

    exit_code = 1

    def line(self) -> str:
        from fmnist_onnx.text import visible

        return f"Error: {visible(self)}"  # names in it are the user's files': shown as they are


class UserError(CommandExit):
    """A mistake the user can fix (missing file, wrong model, bad option value): ``Error: <message>``, exit 2
    (like Click's usage errors). Subclasses set their own ``exit_code`` as a class attribute.

    ``exit_code`` given here overrides the type's: only for an error whose type was lost on the way (a Ray
    actor's, sent to the driver as a code and a message).
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class CheckFailed(UserError):
    """A check that the command exists to make did not pass: verify's parity, export's parity (the model is not
    written) or its int8 model's accuracy (refused): ``Error: <message>``, exit 1."""

    exit_code = 1


class Interrupted(CommandExit):
    """Stopped by a signal (Ctrl-C, SIGTERM) after saving what can be resumed: one line, exit 128 + signum.

    ``Interrupted(signum, saved=None, what="")``:

    - ``signum``: the signal's number; ``exit_code`` is 128 + signum (130 for SIGINT, 143 for SIGTERM).
    - ``saved``: the file that keeps the work done so far (train's checkpoint, classify's journal), or None when
      nothing was kept.
    - ``what``: the rest of the line after ``Interrupted: ``, saying where the work is and how to continue, e.g.
      ``f"checkpoint saved to {path}; run again with --resume to continue."``.

    The line is ``Interrupted: <what>``, or just ``Interrupted.`` when ``what`` is empty, or ``saved`` is None or
    no longer exists (stopped before anything could be resumed). Pickles with its arguments.
    """

    def __init__(self, signum: int, saved: Path | None = None, what: str = "") -> None:
        super().__init__(signum, saved, what)
        self.signum, self.saved, self.what = int(signum), saved, what

    @property
    def exit_code(self) -> int:  # type: ignore[override]  # the class attribute's place, computed
        return 128 + self.signum

    def line(self) -> str:
        import os

        if not self.what or self.saved is None or not os.path.lexists(self.saved):
            return "Interrupted."
        return f"Interrupted: {self.what}"

    def __str__(self) -> str:
        return self.line()


_OWNER = 0  # the process that installed ``_exit_at_once``: the one whose stop it announces


def _exit_at_once(signum, frame) -> None:
    import os

    if os.getpid() != _OWNER:  # a process forked from it (a pool's worker) dies of the signal, saying nothing
        import _signal

        _signal.signal(signum, _signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    os.write(2, b"Interrupted.\n")
    os._exit(128 + signum)


def exit_at_once_on_signals() -> None:
    """Until a command has something to save, Ctrl-C and SIGTERM end the process at once: one line and exit
    130 or 143.

    Python's default raises KeyboardInterrupt wherever the main thread is, which in the first fraction of a
    second means inside an import (onnxruntime's C initialisation turns it into ``ImportError: initialization
    failed``) or Click's own handler ("Aborted!", exit 1); SIGTERM's default ends the process with no word.
    Commands that keep state (classify's journal, train's checkpoint) install their own handling once that
    state exists (``signals.StopSignals``). ``_signal``, not ``signal``: importing the latter builds enums for
    a few milliseconds, long enough to be interrupted itself. A signal ignored when the process started
    (Ctrl-C in a job started with ``&`` or ``nohup``) stays ignored.
    """
    global _OWNER
    import _signal
    import os

    _OWNER = os.getpid()
    for signum in (_signal.SIGINT, _signal.SIGTERM):
        if _signal.getsignal(signum) is not _signal.SIG_IGN:
            _signal.signal(signum, _exit_at_once)
