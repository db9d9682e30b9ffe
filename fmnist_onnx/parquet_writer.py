"""The Parquet output: written, at the end of a run, from its complete JSONL journal (journal.py), streaming
(one row group per 65,536 rows: memory stays flat), into a file that gets its name only when complete
(files.atomic_write)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

from fmnist_onnx import files
from fmnist_onnx.table import ENC, SURROGATE, columns, escape_text, pyarrow_parquet


def write_parquet(journal_fd: int, output: Path, top_k: int, replace: bool) -> None:
    """``output`` written from the JSONL journal open at ``journal_fd`` (read from its start, as opened: never
    by its name again), replacing a file there only where ``replace``. OSError where it cannot be written."""
    with open(journal_fd, "rb", closefd=False) as src:
        src.seek(0)
        files.atomic_write(output, lambda f: _jsonl_to_parquet(src, f, top_k), replace)


def _jsonl_to_parquet(journal: BinaryIO, dest: BinaryIO, top_k: int, rows_per_group: int = 65536) -> None:
    """Stream the JSONL journal into a Parquet file, one row group per ``rows_per_group`` rows. Text is
    copied as the journal holds it, escapes included (see table.py): Parquet strings are UTF-8 too."""
    import pyarrow as pa

    pq = pyarrow_parquet()
    fields = []
    for c in columns(top_k):
        kind = pa.int64() if c == "index" else pa.float64() if c.startswith("score") else pa.string()
        fields.append(pa.field(c, kind))
    schema = pa.schema(fields)
    names = schema.names
    writer_empty = [True]

    def flush(batch: list[dict]) -> None:
        cols = {n: [r.get(n) for r in batch] for n in names}
        # a journal of an older version may hold raw non-UTF-8 bytes (surrogates here): escape those alone
        cols["path"] = [escape_text(p) if SURROGATE.search(p) else p for p in cols["path"]]
        writer.write_table(pa.table(cols, schema=schema))
        writer_empty[0] = False

    with pq.ParquetWriter(dest, schema) as writer:
        batch: list[dict] = []
        for line in journal:
            if not line.endswith(b"\n"):
                break  # a torn tail (--resume cuts it; finish comes after a complete write)
            batch.append(json.loads(line.decode(*ENC)))
            if len(batch) >= rows_per_group:
                flush(batch)
                batch = []
        if batch or writer_empty[0]:  # an empty table still has its columns
            flush(batch)

