"""sinks.py: the three formats round-trip, the journal survives a torn tail, nothing is clobbered."""

from __future__ import annotations

import json
import os

import pytest

from fmnist_onnx.errors import UserError
from fmnist_onnx.sinks import JournalSink, Row, columns, journal_path, read_rows
from fmnist_onnx.spec import CLASSES

ODD_PATHS = ["plain.png", "with space/é accent.png", 'quote"and,comma.png', "new\nline.png",
             os.fsdecode(b"latin1-\xe9.png")]  # not UTF-8: possible on Linux


def make_rows(n: int, top_k: int = 1, offset: int = 0) -> list[Row]:
    rows = []
    for i in range(offset, offset + n):
        path = ODD_PATHS[i % len(ODD_PATHS)] + f".{i}"
        if i % 7 == 3:
            rows.append(Row(path, error="cannot decode: broken PNG file"))
        else:
            idx = [(i + k) % 10 for k in range(top_k)]
            rows.append(Row(path, idx, [0.9 / (k + 1) for k in range(top_k)]))
    return rows


def check_rows(got: list[dict], rows: list[Row], top_k: int) -> None:
    assert [g["path"] for g in got] == [r.path for r in rows]
    for g, r in zip(got, rows, strict=True):
        assert list(g) == columns(top_k)
        if r.error:
            assert g["error"] == r.error and g["label"] is None and g["index"] is None and g["score"] is None
        else:
            assert g["error"] is None
            assert g["index"] == r.indices[0] and g["label"] == CLASSES[r.indices[0]]
            assert g["score"] == pytest.approx(r.scores[0], rel=1e-5)
            for k in range(2, top_k + 1):
                assert g[f"label_{k}"] == CLASSES[r.indices[k - 1]]
                assert g[f"score_{k}"] == pytest.approx(r.scores[k - 1], rel=1e-5)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("top_k", [1, 3])
def test_round_trip(tmp_path, fmt, top_k):
    out = tmp_path / f"preds.{fmt}"
    rows = make_rows(40, top_k)
    sink = JournalSink.open(out, fmt, top_k)
    assert journal_path(out).exists() and not out.exists()  # unfinished never has the final name
    sink.write(rows[:25])
    sink.write(rows[25:])
    assert sink.finish() == out
    assert out.exists() and not journal_path(out).exists()
    got = list(read_rows(out))
    if fmt == "parquet":  # Parquet strings are UTF-8: the one non-UTF-8 name is written with an escape
        assert any("\\xe9" in g["path"] for g in got)
        rows = [Row(g["path"], r.indices, r.scores, r.error) for g, r in zip(got, rows, strict=True)]
    check_rows(got, rows, top_k)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_resume_drops_a_torn_tail_and_continues(tmp_path, fmt):
    out = tmp_path / f"preds.{fmt}"
    rows = make_rows(30)
    sink = JournalSink.open(out, fmt, 1)
    sink.write(rows[:10])
    sink.close()  # as a killed run leaves it...
    with open(journal_path(out), "ab") as f:  # ...or worse: half a line written when the power went
        f.write(b'"new\nline.png.11",Trou' if fmt == "csv" else b'{"path": "x", "lab')
    seen = []
    sink = JournalSink.open(out, fmt, 1, resume=True, on_previous_row=seen.append)
    assert [r["path"] for r in seen] == [r.path for r in rows[:10]]
    sink.write(rows[10:])
    sink.finish()
    got = list(read_rows(out))
    if fmt != "parquet":
        check_rows(got, rows, 1)
    assert len(got) == 30 and len({g["path"] for g in got}) == 30


def test_csv_torn_inside_a_quoted_multiline_path(tmp_path):
    out = tmp_path / "preds.csv"
    sink = JournalSink.open(out, "csv", 1)
    sink.write(make_rows(3))
    sink.close()
    with open(journal_path(out), "ab") as f:
        f.write(b'"new\n')  # ends with a newline, inside quotes: still torn
    seen = []
    JournalSink.open(out, "csv", 1, resume=True, on_previous_row=seen.append).finish()
    assert len(seen) == 3 and len(list(read_rows(out))) == 3


def test_damaged_journal_is_refused(tmp_path):
    out = tmp_path / "preds.jsonl"
    sink = JournalSink.open(out, "jsonl", 1)
    sink.write(make_rows(3))
    sink.close()
    lines = journal_path(out).read_bytes().splitlines(keepends=True)
    journal_path(out).write_bytes(lines[0] + b"garbage\n" + b"".join(lines[1:]))
    with pytest.raises(UserError, match="damaged"):
        JournalSink.open(out, "jsonl", 1, resume=True)


def test_existing_output_or_journal_is_never_clobbered(tmp_path):
    out = tmp_path / "preds.csv"
    out.write_text("precious\n")
    with pytest.raises(UserError, match="--overwrite"):
        JournalSink.open(out, "csv", 1)
    assert out.read_text() == "precious\n"
    out.unlink()
    JournalSink.open(out, "csv", 1).close()  # an interrupted run
    with pytest.raises(UserError, match="--resume"):
        JournalSink.open(out, "csv", 1)
    sink = JournalSink.open(out, "csv", 1, overwrite=True)
    sink.write(make_rows(2))
    sink.finish()
    assert len(list(read_rows(out))) == 2


def test_resume_with_other_columns_is_refused(tmp_path):
    out = tmp_path / "preds.jsonl"
    sink = JournalSink.open(out, "jsonl", 1)
    sink.write(make_rows(2))
    sink.close()
    with pytest.raises(UserError, match="--top-k"):
        JournalSink.open(out, "jsonl", 3, resume=True)


def test_jsonl_nulls_and_csv_empties(tmp_path):
    rows = [Row("a.png", [1], [0.5]), Row("b.png", error="empty file")]
    for fmt in ("csv", "jsonl"):
        sink = JournalSink.open(tmp_path / f"p.{fmt}", fmt, 1)
        sink.write(rows)
        sink.finish()
    assert (tmp_path / "p.csv").read_text().splitlines() == [
        "path,label,index,score,error", "a.png,Trouser,1,0.5,", "b.png,,,,empty file"]
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert lines[0] == {"path": "a.png", "label": "Trouser", "index": 1, "score": 0.5, "error": None}
    assert lines[1] == {"path": "b.png", "label": None, "index": None, "score": None, "error": "empty file"}
