"""SIGINT (Ctrl-C) and SIGTERM while a command keeps state: one context manager, for train and classify.

``StopSignals`` has two modes:

- Flag (the default; train's): a signal only sets ``stop.signum``, which the loop reads at a point where
  stopping is safe (between optimizer steps), saves its state there and raises ``errors.Interrupted``. The
  first signal also puts the previous handlers back, so a second Ctrl-C aborts at once (the ``__main__``
  handler: ``Interrupted.``, exit 130) instead of waiting for the save::

      with StopSignals() as stop:
          for batch in batches:
              step(batch)
              if stop.signum is not None:
                  save()
                  raise Interrupted(stop.signum, saved=path, what=f"checkpoint saved to {path}; ...")

- Raising (``StopSignals(raises=True)``; classify's): either signal raises ``Stopped`` wherever the main thread
  is, a KeyboardInterrupt subclass carrying the signal's number, so that code which already stops cleanly on
  Ctrl-C (worker pools, a local Ray runtime) does the same on SIGTERM. The handlers stay until the block ends.
  The caller turns the exception into ``Interrupted`` once it has closed what it keeps::

      try:
          with StopSignals(raises=True):
              run()
      except BaseException as e:
          close()
          if (signum := signum_of(e)) is not None:
              raise Interrupted(signum, journal, f"rows so far are in {journal}; ...") from None
          raise

In both modes the previous handlers are back when the block ends, whatever ends it. Nothing is installed outside
the main thread (Python runs handlers there alone), and a SIGINT that was ignored when the block began (a job
started with ``&`` by a shell, ``nohup``) stays ignored, as ``errors.exit_at_once_on_signals`` leaves it.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """What a raising ``StopSignals`` raises on SIGINT or SIGTERM: the signal's number in ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)


def signum_of(e: BaseException) -> int | None:
    """The signal that ``e`` stands for: a ``Stopped``'s own, SIGINT for any other KeyboardInterrupt (Python's
    default Ctrl-C), else None (an error, not a signal)."""
    if isinstance(e, Stopped):
        return e.signum
    if isinstance(e, KeyboardInterrupt):
        return int(signal.SIGINT)
    return None


class StopSignals:
    """SIGINT and SIGTERM within a ``with`` block: noted in ``signum`` (the first one's number; None until
    then), and with ``raises=True`` raised as ``Stopped`` too. See the module's docstring."""

    def __init__(self, raises: bool = False) -> None:
        self.raises = raises
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                continue
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = int(signum)
        if self.raises:
            raise Stopped(signum)
        self._restore()  # a second signal: the previous handler's way, at once

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __exit__(self, *exc) -> None:
        self._restore()
        self._old.clear()
