"""progress.py: a bar on a terminal, plain lines in a log (every few seconds, and at the end), nothing with --quiet.
Time is the test's own clock (harness.FakeClock): nothing here waits."""

from __future__ import annotations

import io
import os

from fmnist_onnx.progress import EVERY_S, Lines, Silent, bar
from harness import FakeClock


def _lines(clock: FakeClock, **kwargs) -> tuple[Lines, io.StringIO]:
    out = io.StringIO()
    return Lines("classify", "files", stream=out, clock=clock, **kwargs), out


def test_a_line_every_few_seconds_and_one_at_the_end():
    clock = FakeClock()
    p, out = _lines(clock)
    for _ in range(12):  # 12 updates of 100 files, 1 s apart
        clock.advance(1.0)
        p.update(100)
    p.close()
    assert out.getvalue().splitlines() == [
        "classify: 500 files, 100 files/s, 5 s",
        "classify: 1,000 files, 100 files/s, 10 s",
        "classify: 1,200 files, 100 files/s, 12 s",
    ]


def test_the_end_line_is_not_the_last_line_again():
    clock = FakeClock()
    p, out = _lines(clock)
    clock.advance(EVERY_S)
    p.update(10)
    p.close()
    p.close()
    assert out.getvalue().splitlines() == ["classify: 10 files, 2 files/s, 5 s"]


def test_rate_counts_this_run_and_total_is_shown():
    clock = FakeClock()
    p, out = _lines(clock, total=1000, initial=400)  # a resumed run: 400 done before
    clock.advance(2.0)
    p.update(100)
    p.close()
    assert out.getvalue() == "classify: 500/1,000 files, 50 files/s, 2 s\n"


def test_a_file_gets_lines_a_terminal_a_bar_and_quiet_nothing(tmp_path):
    with open(tmp_path / "log", "w") as log:
        assert isinstance(bar("x", stream=log), Lines)
        assert isinstance(bar("x", stream=log, lines=False), Silent)
        assert isinstance(bar("x", stream=log, enabled=False), Silent)
    main, secondary = os.openpty()  # a real terminal
    with os.fdopen(secondary, "w") as tty:
        b = bar("x", stream=tty, total=3)
        assert type(b).__name__ == "tqdm" and not b.disable
        b.close()
    os.close(main)


def test_no_rate_at_close_where_the_summary_gives_the_runs():
    """classify: the summary's images/s is the run's one speed figure; the last line gives count and time only."""
    clock = FakeClock()
    p, out = _lines(clock, rate_at_close=False)
    for _ in range(6):
        clock.advance(1.0)
        p.update(100)
    p.close()
    assert out.getvalue().splitlines() == ["classify: 500 files, 100 files/s, 5 s", "classify: 600 files, 6 s"]
