"""The exceptions that end a command with one line on stderr instead of a traceback, and Ctrl-C's first handler.

An exception's exit code is a property of its type (click's ``ClickException.exit_code``): the CLI
(``cli._Group.invoke``) prints ``e.line()`` and exits with ``e.exit_code``, in that one place; no command picks
a number. The codes:

  1      CheckFailed            a check the command exists to make did not pass (verify; export's parity, int8)
  2      UserError              a mistake the user can fix (missing file, wrong model, bad option value)
  3      -                      classify finished, but some files failed (rows with an error): not an exception
  4      sinks.OutputError      classify's output could not be written mid-run (the journal keeps the rows)
  5      runtime.ModelRunError  the model failed mid-run (onnxruntime out of memory; the journal keeps the rows)
  128+N  Interrupted            stopped by signal N after saving what can be resumed (130: Ctrl-C, 143: SIGTERM)

This module imports nothing at the top: ``__main__`` imports it before anything else (see
``exit_at_once_on_ctrl_c``).
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


def _exit_130(signum, frame) -> None:
    import os

    os.write(2, b"Interrupted.\n")
    os._exit(128 + signum)


def exit_at_once_on_ctrl_c() -> None:
    """Until a command has something to save, Ctrl-C ends the process at once: exit 130 and one line.

    Python's default raises KeyboardInterrupt wherever the main thread is, which in the first fraction of a
    second means inside an import (onnxruntime's C initialisation turns it into ``ImportError: initialization
    failed``) or Click's own handler ("Aborted!", exit 1). Commands that keep state (classify's journal,
    train's checkpoint) install their own handling once that state exists (``signals.on_signals``).
    ``_signal``, not ``signal``: importing the latter builds enums for a few milliseconds, long enough to be
    interrupted itself.
    """
    import _signal

    if _signal.getsignal(_signal.SIGINT) is not _signal.SIG_IGN:  # started with Ctrl-C ignored (nohup, &): keep it
        _signal.signal(_signal.SIGINT, _exit_130)
