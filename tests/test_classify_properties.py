"""Property test of the journal reader on --resume (issue 17): whatever a journal holds, the real command gives a
finished output with exactly one row per file of the walk, or one line and exit 2 with the journal as it was:
never a traceback, never a row count that differs from the files walked."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fmnist_onnx.classify import RunIdentity, identity_path
from fmnist_onnx.journal import journal_path
from fmnist_onnx.spec import CLASSES
from fmnist_onnx.table import read_rows
from harness import assert_one_line_error, run_cli

N = 20


@pytest.fixture(scope="module")
def small(test_pngs, tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("prop") / "in"
    (folder / "Bag").mkdir(parents=True)
    for src in sorted((test_pngs / "Bag").glob("*.png"))[:N]:
        shutil.copy(src, folder / "Bag" / src.name)
    return folder, sorted(str(p) for p in (folder / "Bag").glob("*.png"))


junk = st.none() | st.booleans() | st.integers(-20, 120) | st.floats() | st.text(max_size=8) | st.lists(
    st.integers(), max_size=2)


@st.composite
def journal(draw, paths: list[str], fmt: str) -> bytes:
    """Mostly rows this tool writes, for files of the walk; some with a field of any type, a foreign path or a
    file twice; now and then a line of any bytes; perhaps a torn tail."""
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        index = draw(st.integers(0, 9))
        row = {"path": draw(st.sampled_from(paths)), "label": CLASSES[index], "index": index,
               "score": draw(st.floats(0, 1)), "error": None, "true_label": "Bag"}
        kind = draw(st.integers(0, 9))
        if kind == 0:
            row["path"] = draw(st.sampled_from(["/elsewhere.png", paths[0] + "x", ""]))
        elif kind == 1:
            row[draw(st.sampled_from(list(row)))] = draw(junk)
        elif kind == 2:
            row = {**row, "label": None, "index": None, "score": None, "error": draw(st.text(min_size=1, max_size=9)),
               "true_label": "Bag"}
        if kind == 3:
            lines.append(draw(st.binary(max_size=30)).replace(b"\n", b" ") + b"\n")
        elif fmt == "csv":
            cells = ["" if v is None else str(v) for v in row.values()]
            lines.append((",".join(f'"{c}"' if "," in c or '"' in c else c for c in cells) + "\n").encode(
                "utf-8", "surrogatepass"))
        else:
            lines.append((json.dumps(row) + "\n").encode())
    head = b"path,label,index,score,error,true_label\n" if fmt == "csv" and draw(st.booleans()) else b""
    return head + b"".join(lines) + draw(st.sampled_from([b"", b'{"pa', b"Bag,1"]))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data(), fmt=st.sampled_from(["csv", "jsonl", "parquet"]))
def test_any_journal_gives_one_row_per_walked_file_or_one_line(small, onnx_model, data, fmt):
    folder, paths = small
    content = data.draw(journal(paths, fmt))
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / f"preds.{fmt}"
        journal_path(out).write_bytes(content)
        identity_path(out).write_text(RunIdentity.of(onnx_model, "auto", 1, True, [str(folder)]).to_json())
        proc = run_cli("classify", folder, "-m", onnx_model, "-o", out, "--resume", "--workers", "1", "-q")
        event(f"exit {proc.returncode}")
        if proc.returncode == 2:
            assert_one_line_error(proc, 2)
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
            assert journal_path(out).read_bytes() == content and not out.exists()
        else:
            assert proc.returncode in (0, 3) and "Traceback" not in proc.stderr, proc.stderr
            assert sorted(r["path"] for r in read_rows(out)) == paths
