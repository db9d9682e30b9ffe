"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """A mistake the user can fix (missing file, wrong model, bad option value).

    The CLI prints ``Error: <message>`` and exits with ``exit_code`` (2, like Click's usage errors).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code



def _exit_130(signum, frame) -> None:
    import os

    os.write(2, b"Interrupted.\n")
    os._exit(128 + signum)


def exit_at_once_on_ctrl_c() -> None:
    """Until a command has something to save, Ctrl-C ends the process at once: exit 130 and one line.

    Python's default raises KeyboardInterrupt wherever the main thread is, which in the first fraction of a
    second means inside an import (onnxruntime's C initialisation turns it into ``ImportError: initialization
    failed``) or Click's own handler ("Aborted!", exit 1). Commands that keep state (classify's journal,
    train's checkpoint) install their own handling once that state exists. ``_signal``, not ``signal``:
    importing the latter builds enums for a few milliseconds, long enough to be interrupted itself.
    """
    import _signal

    if _signal.getsignal(_signal.SIGINT) is not _signal.SIG_IGN:  # started with Ctrl-C ignored (nohup, &): keep it
        _signal.signal(_signal.SIGINT, _exit_130)
