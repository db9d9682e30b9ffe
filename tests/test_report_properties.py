"""Property tests of what the report reads: any table (JSONL, CSV, Parquet, raw bytes) and any summary give a
page, or one line (UserError, which the CLI prints as `Error: ...` with exit 2): never another exception. A
page counts exactly the rows of the table.

In-process (build_report and load_summary, as the command calls them) to keep each example to milliseconds;
tests/test_report_hostile.py runs the same readers through the real CLI.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmnist_onnx.errors import UserError
from fmnist_onnx.report import build_report, load_summary
from fmnist_onnx.spec import CLASSES

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
COLUMNS = ["path", "label", "index", "score", "error"]

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3),
                           max_leaves=6)
names = st.text(min_size=1, max_size=30) | st.sampled_from(["Bag/a.png", "x/\u202eTrouser/b.png", ".", "/"])
plausible = {"path": names, "label": st.sampled_from(CLASSES) | st.none(), "index": st.integers(-3, 12) | st.none(),
             "score": st.floats(0, 1) | st.floats() | st.none(), "error": st.none() | st.text(max_size=30)}


@st.composite
def rows(draw) -> list:
    """Rows mostly of the right shape, each value sometimes of any JSON type; now and then not an object."""
    out = []
    for _ in range(draw(st.integers(0, 6))):
        row = {k: draw(v | json_values) if draw(st.integers(0, 4)) == 0 else draw(v) for k, v in plausible.items()}
        out.append(draw(json_values) if draw(st.integers(0, 15)) == 0 else row)
    return out


def outcome(table: Path) -> int | None:
    """The rows a page counted, or None for a one-line refusal; any other exception fails the test."""
    try:
        return build_report(table, table.with_suffix(".html")).rows
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(str(e))
        return None


@SETTINGS
@given(rows())
def test_any_jsonl_table_gives_a_page_of_its_rows_or_one_line(table_rows):
    with tempfile.TemporaryDirectory() as d:
        table = Path(d) / "t.jsonl"
        table.write_text("".join(json.dumps(r) + "\n" for r in table_rows))
        n = outcome(table)
        assert n is None or n == len(table_rows)


@SETTINGS
@given(rows())
def test_any_csv_table_gives_a_page_of_its_rows_or_one_line(table_rows):
    with tempfile.TemporaryDirectory() as d:
        table = Path(d) / "t.csv"
        with open(table, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(COLUMNS)
            for r in table_rows:
                w.writerow([r.get(k, "") if isinstance(r, dict) else r for k in COLUMNS])
        n = outcome(table)
        assert n is None or n == len(table_rows)


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from([".csv", ".jsonl", ".parquet", ""]))
def test_any_bytes_after_a_header_give_a_page_or_one_line(tail, suffix):
    with tempfile.TemporaryDirectory() as d:
        table = Path(d) / f"t{suffix}"
        head = b"path,label,index,score,error\n" if suffix in (".csv", "") else b""
        table.write_bytes(head + tail)
        outcome(table)


parquet_columns = {"path": st.sampled_from(["string", "int64", "null"]), "label": st.sampled_from(["string", "int64"]),
                   "index": st.sampled_from(["int64", "string", "float64"]),
                   "score": st.sampled_from(["float64", "string", "float32"]),
                   "error": st.sampled_from(["string", "null", "int64"])}


@SETTINGS
@given(st.fixed_dictionaries(parquet_columns), st.lists(st.integers(-2, 11), max_size=5))
def test_a_parquet_table_of_any_column_types_gives_a_page_or_one_line(types, indices):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    def column(name: str, kind: str) -> object:
        values = {"path": [f"Bag/{i}.png" for i in indices], "label": [CLASSES[i % 10] for i in indices],
                  "index": indices, "score": [0.5] * len(indices), "error": [None] * len(indices)}[name]
        if kind == "string":
            values = [None if v is None else str(v) for v in values]
        elif kind in ("int64", "float64", "float32"):
            values = [None if v is None else (len(v) if isinstance(v, str) else v) for v in values]
        return pa.array(values, getattr(pa, kind)()) if kind != "null" else pa.nulls(len(values))

    with tempfile.TemporaryDirectory() as d:
        table = Path(d) / "t.parquet"
        pq.write_table(pa.table({k: column(k, t) for k, t in types.items()}), table)
        n = outcome(table)
        assert n is None or n == len(indices)


# ---------------------------------------------------------------------------------------------- summaries

VALID = {"output": "t.csv", "format": "csv", "provider": "CPUExecutionProvider", "workers": 2, "decoder": "pillow",
         "files": 1, "classified": 1, "failed": 0, "skipped": 0, "resumed": 0, "seconds": 0.5, "images_per_s": 2.0,
         "accuracy_pct": 100.0, "per_class": None, "confusion_png": None, "failures": [], "already_complete": False}


def summary_outcome(text: str) -> dict | None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "run.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            return load_summary(path)
        except UserError as e:
            assert "\n" not in str(e) and str(path) in str(e), repr(str(e))
            return None


@SETTINGS
@given(json_values)
def test_any_json_as_a_summary_is_read_or_one_line(value):
    assert summary_outcome(json.dumps(value)) is None or isinstance(value, dict)


@SETTINGS
@given(st.sampled_from(sorted(VALID)), json_values | st.sampled_from(["", "a\x00b", "\u202e", "../x.csv"]))
def test_a_summary_with_any_value_in_one_field_renders_or_is_one_line(key, value):
    """Whatever the summary reader accepts, the page renders (a huge number, an empty text, a null)."""
    run = summary_outcome(json.dumps({**VALID, key: value}))
    if run is None:
        return
    with tempfile.TemporaryDirectory() as d:
        table = Path(d) / "t.csv"
        table.write_text("path,label,index,score,error\nBag/a.png,Bag,8,0.5,\n")
        assert build_report(table, Path(d) / "r.html", run=run).rows == 1


@SETTINGS
@given(st.integers(1, 60_000), st.sampled_from(["[", '{"a":']))
def test_a_summary_nested_any_depth_is_read_or_one_line(depth, opener):
    closer = "]" if opener == "[" else "}"
    assert summary_outcome(opener * depth + "1" + closer * depth) is None
