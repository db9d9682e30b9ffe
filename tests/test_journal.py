"""table.py and journal.py: the three formats round-trip, the journal survives a torn tail, nothing is clobbered.
(Full disks and read-only folders, which need a tmpfs: test_journal_failures.py.)"""

from __future__ import annotations

import csv
import json
import os
import stat

import pytest

from fmnist_onnx.errors import UserError
from fmnist_onnx.journal import JournalSink, RowRefused, journal_path
from fmnist_onnx.spec import CLASSES
from fmnist_onnx.table import FORMATS, Row, columns, format_for, read_rows

ODD_PATHS = ["plain.png", "with space/é accent.png", 'quote"and,comma.png', "new\nline.png", "carriage\rreturn.png",
             "crlf\r\n.png", os.fsdecode(b"latin1-\xe9.png"),  # not UTF-8: possible on Linux
             "looks\\xe9like an escape.png", "back\\slash.png", "two\\\\backslashes.png"]


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
    check_rows(list(read_rows(out)), rows, top_k)  # every name exactly, in all three formats


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
    check_rows(list(read_rows(out)), rows, 1)


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
        "path,label,index,score,error,true_label", "a.png,Trouser,1,0.5,,", "b.png,,,,empty file,"]
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert lines[0] == {"path": "a.png", "label": "Trouser", "index": 1, "score": 0.5, "error": None,
                        "true_label": None}
    assert lines[1] == {"path": "b.png", "label": None, "index": None, "score": None, "error": "empty file",
                        "true_label": None}


# ---------------------------------------------------------------------------------------------- hostile names

@pytest.mark.parametrize("top_k", [1, 3])  # top-1 has its own fast path
def test_csv_quotes_cr_and_lf_and_resume_reads_them_back(tmp_path, top_k):
    names = ["a\rb.png", "c\r\nd.png", "e\nf.png", 'g,"h.png', "plain.png"]
    rows = [Row(n, list(range(top_k)), [0.5] * top_k) for n in names] + [Row("x\ry.png", error="bad,\r\"file\"")]
    out = tmp_path / "p.csv"
    sink = JournalSink.open(out, "csv", top_k)
    sink.write(rows[:3])
    sink.close()  # interrupted: --resume must read the CR rows back (it failed with _csv.Error)
    seen = []
    sink = JournalSink.open(out, "csv", top_k, resume=True, on_previous_row=seen.append)
    assert [r["path"] for r in seen] == names[:3]
    sink.write(rows[3:])
    sink.finish()
    check_rows(list(read_rows(out)), rows, top_k)
    with open(out, newline="", encoding="utf-8") as f:  # any CSV reader sees one record per row
        records = list(csv.reader(f, strict=True))
    assert [r[0] for r in records[1:]] == [r.path for r in rows] and records[-1][-2] == 'bad,\r"file"'


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_name_that_is_not_utf8_round_trips_and_outputs_stay_utf8(tmp_path, fmt):
    names = [os.fsdecode(b"\xff.png"), os.fsdecode(b"dir\xe9/\xc3(.png"), "caf\u00e9.png",
             "\\xff.png", "\\\\xff.png", "\\x41.png"]  # the last three are UTF-8 names that look like escapes
    rows = [Row(n, [3], [0.75]) for n in names] + [Row(os.fsdecode(b"bad\xfe.png"), error="cannot decode")]
    out = tmp_path / f"p.{fmt}"
    sink = JournalSink.open(out, fmt, 1)
    sink.write(rows[:2])
    sink.close()
    seen = []
    sink = JournalSink.open(out, fmt, 1, resume=True, on_previous_row=seen.append)
    assert [r["path"] for r in seen] == names[:2]  # --resume skips these files: the same str as the walk's
    sink.write(rows[2:])
    sink.finish()
    got = list(read_rows(out))
    assert [g["path"] for g in got] == [r.path for r in rows]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        written = pq.read_table(out).column("path").to_pylist()  # valid strings: pyarrow decoded them
        assert written[0] == "\\xff.png" and written[3] == "\\\\xff.png"
    else:
        text = out.read_bytes().decode("utf-8")  # strict: not one stray byte
        if fmt == "jsonl":
            assert [json.loads(line)["path"] for line in text.splitlines()][:2] == ["\\xff.png", "dir\\xe9/\\xc3(.png"]


def test_format_for_refuses_contradictions_and_honours_format_without_a_suffix():
    assert format_for("p.csv", None) == "csv" and format_for("p.CSV", "csv") == "csv"
    assert format_for("-", None) == "csv" and format_for("-", "csv") == "csv"
    assert format_for("preds", "jsonl") == "jsonl" and format_for("preds.txt", "parquet") == "parquet"
    with pytest.raises(UserError, match="--format says jsonl"):
        format_for("o.csv", "jsonl")
    with pytest.raises(UserError, match="-o - writes CSV only"):
        format_for("-", "jsonl")
    with pytest.raises(UserError, match="cannot tell the format"):
        format_for("preds", None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_rows_of_a_suffixless_output(tmp_path, fmt):
    out = tmp_path / "preds"
    sink = JournalSink.open(out, fmt, 1)
    sink.write(make_rows(5))
    sink.finish()
    check_rows(list(read_rows(out)), make_rows(5), 1)


def _char_device(path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers: harmless if written
    except PermissionError:
        pytest.skip("mknod needs root (CAP_MKNOD)")


@pytest.mark.parametrize("kind", ["fifo", "char device", "fifo journal"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_only_regular_files_are_written_or_replaced(tmp_path, kind, overwrite):
    out = tmp_path / "preds.csv"
    target = journal_path(out) if kind == "fifo journal" else out
    if kind == "char device":
        _char_device(target)
    else:
        os.mkfifo(target)
    with pytest.raises(UserError, match="only regular files"):
        JournalSink.open(out, "csv", 1, overwrite=overwrite)
    mode = os.lstat(target).st_mode
    assert stat.S_ISCHR(mode) if kind == "char device" else stat.S_ISFIFO(mode)


# ---------------------------------------------------------------------------------------------- the journal's own file

def _interrupted(out, fmt: str = "csv", n: int = 3) -> bytes:
    sink = JournalSink.open(out, fmt, 1)
    sink.write(make_rows(n))
    sink.close()
    return journal_path(out).read_bytes()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_link_at_the_journal_is_refused_on_resume_and_removed_itself_by_overwrite(tmp_path, overwrite):
    out = tmp_path / "preds.csv"
    target = tmp_path / "notes.txt"
    target.write_text(csv_header_text := "path,label,index,score,error\n")  # even one that reads as a journal
    journal_path(out).symlink_to(target)
    if overwrite:
        sink = JournalSink.open(out, "csv", 1, overwrite=True)
        sink.write(make_rows(2))
        sink.finish()
        assert len(list(read_rows(out))) == 2 and not os.path.lexists(journal_path(out))
    else:
        with pytest.raises(UserError, match="symbolic link"):
            JournalSink.open(out, "csv", 1, resume=True)
        assert journal_path(out).is_symlink()
    assert target.read_text() == csv_header_text


def test_a_new_journal_is_never_opened_through_a_dangling_link(tmp_path):
    out = tmp_path / "preds.csv"
    journal_path(out).symlink_to(tmp_path / "elsewhere.csv")
    with pytest.raises(UserError, match="--resume"):  # an interrupted run's name: not taken over
        JournalSink.open(out, "csv", 1)
    assert not (tmp_path / "elsewhere.csv").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_finish_replaces_a_link_at_the_output_never_its_target(tmp_path, fmt):
    out, target = tmp_path / f"preds.{fmt}", tmp_path / "precious.txt"
    target.write_text("keep me\n")
    out.symlink_to(target)
    sink = JournalSink.open(out, fmt, 1, overwrite=True)
    sink.write(make_rows(4))
    sink.finish()
    assert not out.is_symlink() and len(list(read_rows(out))) == 4
    assert target.read_text() == "keep me\n"
    assert sorted(os.listdir(tmp_path)) == sorted([out.name, target.name])  # no temporary file left


BAD_ROWS = {  # what a journal line may hold that this tool never writes, and what the message says of it
    "index eight": ({"index": "eight"}, "index"), "index 99": ({"index": 99}, "index"),
    "index -3": ({"index": -3}, "index"), "score high": ({"score": "high"}, "score"),
    "score 1.5": ({"score": 1.5}, "score"), "wrong label": ({"label": "Bag"}, "label"),
    "error and class": ({"error": "broken"}, "error"), "empty path": ({"path": ""}, "path"),
}


def _line(fmt: str, change: dict) -> bytes:
    rec = {"path": "x.png", "label": "Trouser", "index": 1, "score": 0.5, "error": None, "true_label": None, **change}
    if fmt == "csv":
        return (",".join("" if v is None else str(v) for v in rec.values()) + "\n").encode()
    return (json.dumps(rec) + "\n").encode()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", BAD_ROWS)
def test_resume_refuses_a_row_of_the_wrong_type_naming_its_line_and_changes_nothing(tmp_path, fmt, case):
    change, word = BAD_ROWS[case]
    out = tmp_path / f"preds.{fmt}"
    _interrupted(out, fmt)
    with open(journal_path(out), "ab") as f:
        f.write(_line(fmt, change) + _line(fmt, {}) + b'{"torn')  # then a good row, then a torn tail
    before = journal_path(out).read_bytes()
    with pytest.raises(UserError, match=rf"line {5 if fmt == 'csv' else 4} .*{word}") as refused:
        JournalSink.open(out, fmt, 1, resume=True, on_previous_row=lambda row: None)
    assert "\n" not in str(refused.value) and "Traceback" not in str(refused.value)
    assert journal_path(out).read_bytes() == before


@pytest.mark.parametrize("line", [b"[1, 2]\n", b"[" * 30000 + b"]" * 30000 + b"\n", b'"text"\n',
                                  b'{"path": "x.png"}\n'])
def test_a_jsonl_line_that_is_not_a_row_is_one_line(tmp_path, line):
    out = tmp_path / "preds.jsonl"
    _interrupted(out, "jsonl")
    with open(journal_path(out), "ab") as f:
        f.write(line + _line("jsonl", {}))
    with pytest.raises(UserError, match="line 4"):
        JournalSink.open(out, "jsonl", 1, resume=True)


def test_a_row_refused_by_the_caller_names_its_line(tmp_path):
    out = tmp_path / "preds.csv"
    before = _interrupted(out)

    def refuse_the_second(row: dict) -> None:
        if row["path"] == make_rows(3)[1].path:
            raise RowRefused("is not wanted")

    with pytest.raises(UserError, match=r"line 3 is not wanted; the journal is left as it was"):
        JournalSink.open(out, "csv", 1, resume=True, on_previous_row=refuse_the_second)
    assert journal_path(out).read_bytes() == before


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_read_rows_of_a_finished_table_with_a_wrong_row_is_one_line(tmp_path, fmt):
    out = tmp_path / f"preds.{fmt}"
    head = b"path,label,index,score,error,true_label\n" if fmt == "csv" else b""
    out.write_bytes(head + _line(fmt, {"index": "eight"}))
    with pytest.raises(UserError, match="index 'eight'"):
        list(read_rows(out))


def test_a_table_of_the_earlier_version_without_true_label_is_still_read(tmp_path):
    out = tmp_path / "old.csv"
    out.write_bytes(b"path,label,index,score,error\nBag/1.png,Bag,8,0.9,\n")
    rows = list(read_rows(out))
    assert rows == [{"path": "Bag/1.png", "label": "Bag", "index": 8, "score": 0.9, "error": None}]
