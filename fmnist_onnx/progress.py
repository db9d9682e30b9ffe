"""Progress on stderr, wherever stderr goes: one policy for train, classify, export, verify, data export-png and
bench.

On a terminal, a tqdm bar. Anywhere else (a file, a pipe: CI, nohup, a job scheduler) a bar's carriage returns
make an unreadable log, and no output at all looks like a hung job: there, plain lines, one every few seconds
and one at the end. --quiet gives ``enabled=False``: nothing. All three have a bar's ``update(n)``,
``set_postfix(...)``, ``close()`` and ``disable``, so a call site does not care which it got.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

EVERY_S = 5.0  # seconds between two plain lines


class Silent:
    """No progress at all (--quiet; or a bar that has no plain-line form, such as train's steps)."""

    disable = True

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class Lines:
    """Progress as plain lines for a log: ``classify: 12,345 images, 1,234 images/s, 10 s`` every ``every`` seconds
    (at the first update after them) and once at ``close``. The rate counts this run's work, not ``initial``
    (files a resumed run had already done). ``clock`` is injectable: tests drive time, never wait for it.
    Not ``rate_at_close``: the line at ``close`` gives no rate, where the command's summary gives the run's
    (classify: one speed figure per run, not the bar's beside the summary's)."""

    disable = False

    def __init__(self, desc: str, noun: str, total: int | None = None, initial: int = 0, every: float = EVERY_S,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 rate_at_close: bool = True) -> None:
        self.desc, self.noun, self.total, self.every = desc, noun, total, every
        self.rate_at_close = rate_at_close
        self.n = self.initial = initial
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.start = self.last = clock()
        self.shown = None  # the count the last line gave
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every:
            self._line(now)

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.shown != self.n:  # not the line just written again
                self._line(self.clock(), rate=self.rate_at_close)

    def _line(self, now: float, rate: bool = True) -> None:
        self.last, self.shown = now, self.n
        elapsed = now - self.start
        done = f"{self.n:,}" if self.total is None else f"{self.n:,}/{self.total:,}"
        speed = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        speed_part = f"{speed:,.0f} {self.noun}/s, " if rate else ""
        print(f"{self.desc}: {done} {self.noun}, {speed_part}{elapsed:.0f} s", file=self.stream, flush=True)


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def bar(desc: str, *, enabled: bool = True, total: int | None = None, initial: int = 0, unit: str = "img",
        noun: str | None = None, lines: bool = True, stream: TextIO | None = None, rate_at_close: bool = True,
        **tqdm_options):
    """A tqdm bar on a terminal; elsewhere ``Lines`` (``noun``, default ``unit``, is the word in them), or
    ``Silent`` where ``lines`` is False; ``Silent`` too when not ``enabled``. ``tqdm_options`` go to tqdm alone.
    Not ``rate_at_close``: no rate left behind at the end (a bar is cleared, Lines' last line has none), where
    the command's summary gives the run's own."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return Silent()
    if is_terminal(stream):
        from tqdm import tqdm

        return tqdm(desc=desc, total=total, initial=initial, unit=unit, file=stream,
                    **({"leave": False} if not rate_at_close else {}), **tqdm_options)
    if not lines:
        return Silent()
    return Lines(desc, noun or unit, total, initial, stream=stream, rate_at_close=rate_at_close)


def note(line: str, stream: TextIO | None = None) -> None:
    """A line of its own (an epoch's result) on stderr: above a terminal's bar, without breaking it, or plain."""
    stream = sys.stderr if stream is None else stream
    if is_terminal(stream):
        from tqdm import tqdm

        tqdm.write(line, file=stream)
    else:
        print(line, file=stream, flush=True)


def stages(desc: str, enabled: bool = True, stream: TextIO | None = None) -> Callable[[str], None]:
    """``say(what)`` writes ``desc: what`` as a line of its own (``note``): for a command whose work is a few
    stages of seconds each (export, verify), not a count to show in a bar. Said before each stage starts, so the
    first line comes at once, before the heavy imports. Not ``enabled`` (--quiet): nothing."""
    def say(what: str) -> None:
        if enabled:
            note(f"{desc}: {what}", stream)

    return say
