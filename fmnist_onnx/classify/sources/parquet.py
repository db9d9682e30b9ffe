"""The Parquet source: tables with a column of encoded images, the layout of the image datasets on the Hugging
Face Hub (an ``image`` struct of ``bytes`` and ``path``, a ``label`` whose class names are in the schema's
``huggingface`` metadata), or any table with one column of image bytes; or the column named by
``--image-column`` (``image_column``: a binary column, or a struct with a binary ``bytes`` field). Rows are
named ``<file>::row/<N>`` (N from 0, in the file's order).

The walk (this process) reads the metadata and the label column only; the workers read the image column in
record batches of at most BATCH_ROWS rows and about CHUNK_BYTES (the last batch kept: chunks and batches need
not line up), make bytes of the rows their chunks name only, and hand the images on one at a time
(``_Batches``), keeping the files and the batch being read on a Reader between chunks. A row group can only
be read from its start, and the chunks of one group (`datasets` writes 60,000 rows as one) go to every worker
in turn: so a worker's first chunk waits for one small batch, not for the whole group. A column chunk with a
dictionary page (read a group at a time where it is CHUNK_BYTES or less: small batches of it are slow) is read
with its dictionary kept encoded, each row's image the dictionary's own bytes: a dictionary may repeat one
value in every row (a 902-byte file, one 20 MiB value and 60 rows pointing at it, decodes to 1.26 GB where the
footer says 20 MiB), and it is held once, not once a row.
A row group that cannot be read (a damaged file) gives its rows error rows; the run goes on. A file damaged (or
replaced) after check() read it is handled as a damaged tar: one error row ``<file>::`` where the walk cannot
open it, else error rows for the rows the workers cannot read, and the run goes on."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from fmnist_onnx.classify.contract import CHUNK_BYTES, Batch, Members
from fmnist_onnx.classify.sources import members
from fmnist_onnx.errors import UserError
from fmnist_onnx.images import MAX_FILE_BYTES, ImageError
from fmnist_onnx.spec import CLASSES
from fmnist_onnx.text import first_line, visible

log = logging.getLogger(__name__)



def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet inputs need pyarrow: pip install pyarrow (or fmnist-onnx[parquet])") from None
    return pq


def image_column(schema, name: str | None = None) -> tuple[str, bool]:
    """(the column of image bytes, whether it is a struct whose ``bytes`` field holds them): the column
    ``name`` (--image-column), else the only one, else the one named ``image``; UserError where the named
    column is missing or holds no bytes, or the table has none, or several and none named ``image``."""
    found = [(field.name, _is_struct_of_bytes(field.type)) for field in schema
             if _is_binary(field.type) or _is_struct_of_bytes(field.type)]
    if name is not None:
        return _named(schema, name, found)
    if not found:
        raise UserError(f"no column of image bytes (columns: {', '.join(visible(n) for n in schema.names)}); "
                        "a Parquet input needs a binary column, or a struct with a 'bytes' field (the Hugging "
                        "Face Image feature)")
    if len(found) > 1:
        named = [f for f in found if f[0] == "image"]
        if not named:
            raise UserError(f"several columns of bytes ({', '.join(visible(f[0]) for f in found)}) and none "
                            "named 'image': name the one that holds the images with --image-column")
        return named[0]
    return found[0]


def _named(schema, name: str, found: list[tuple[str, bool]]) -> tuple[str, bool]:
    """The column ``name`` of ``found`` (the columns of bytes), or a UserError saying why not."""
    count = schema.names.count(name)
    if count == 0:
        raise UserError(f"no column {visible(name)!r} (--image-column); its columns: "
                        f"{', '.join(visible(n) for n in schema.names)}")
    if count > 1:
        raise UserError(f"{count} columns are named {visible(name)!r} (--image-column): cannot tell which to read")
    for column in found:
        if column[0] == name:
            return column
    raise UserError(f"column {visible(name)!r} (--image-column) is {visible(str(schema.field(name).type))}, not "
                    "image bytes: name a binary column, or a struct with a binary 'bytes' field")


def _is_binary(t) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_struct_of_bytes(t) -> bool:
    """The Hugging Face Image feature's layout: a struct whose ``bytes`` field is binary."""
    import pyarrow as pa

    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type)


def label_map(schema) -> tuple[str, np.ndarray] | None:
    """(the label column, its values -> our class index, -1 where none), or None: a ``label`` column of
    integers, named through the ClassLabel of the ``huggingface`` metadata when there is one (names compared
    without spaces or case: the Hub's 'T - shirt / top' is our 'T-shirt/top'), else taken as our class
    indices."""
    import pyarrow as pa

    if "label" not in schema.names or not pa.types.is_integer(schema.field("label").type):
        return None
    names = _class_names(schema.metadata or {})
    if names is None:
        return "label", np.arange(len(CLASSES), dtype=np.int16)
    ours = {_norm(c): i for i, c in enumerate(CLASSES)}
    return "label", np.array([ours.get(_norm(n), -1) for n in names], np.int16)


def _norm(name: object) -> str:
    return "".join(str(name).split()).lower()


def _class_names(metadata: dict) -> list | None:
    try:
        info = json.loads(metadata[b"huggingface"])["info"]["features"]["label"]
        names = info["names"] if info.get("_type") == "ClassLabel" else None
    except (KeyError, TypeError, ValueError, RecursionError):  # RecursionError: JSON nested too deeply
        return None
    return names if isinstance(names, list) and len(names) <= 100_000 else None


def _open(path: str, name: str | None = None):
    """(the ParquetFile, its image column), or a UserError saying why not (without the file's name: check()
    adds it; a row's path names it)."""
    pq = _pq()
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"not a readable Parquet file ({first_line(e)})") from None
    return pf, image_column(pf.schema_arrow, name)


def check(paths: Sequence[str], image_column: str | None = None) -> list[str]:
    members.check_files(paths, "Parquet")
    _pq()
    for p in paths:
        try:
            _open(p, image_column)
        except UserError as e:
            raise UserError(f"{visible(p)}: {e}") from None
    return list(paths)


def walk_batches(paths: Sequence[str], recursive: bool = True, exclude: Sequence[str] = (),
                 image_column: str | None = None) -> Iterator[Batch]:
    """A Batch per row group: its rows' units, their row numbers, and their true classes; the Members carry
    ``image_column`` to the workers that read them."""
    for path in paths:
        try:
            pf, _ = _open(path, image_column)
        except UserError as e:  # check() read it: damaged (or replaced) since, like a tar that cannot be listed
            yield members.broken(path, e)
            continue
        labels = label_map(pf.schema_arrow)
        start = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            truth = _truth(pf, g, n, labels)
            units = [f"{path}::row/{i}" for i in range(start, start + n)]
            yield Batch(units, [], None, Members("parquet", path, units, range(start, start + n), truth,
                                                 column=image_column))
            start += n


def _truth(pf, g: int, n: int, labels: tuple[str, np.ndarray] | None) -> list[int]:
    import pyarrow as pa

    if labels is None:
        return [-1] * n
    column, lookup = labels
    try:
        # to_pylist, not to_numpy: pyarrow's to_numpy imports pandas (seconds, once)
        values = pf.read_row_group(g, columns=[column], use_threads=False).column(0).to_pylist()
    except (pa.ArrowException, OSError, ValueError):
        return [-1] * n  # the images' read fails too, and says why in their rows
    # compared as Python ints first: a uint64 label of 2^63 or more fits no int64, and names no class
    top = len(lookup)
    idx = np.array([v if v is not None and 0 <= v < top else -1 for v in values], np.int64)
    return np.where(idx >= 0, lookup[idx], -1).tolist()


# ---------------------------------------------------------------------------------------------- in a worker

BATCH_ROWS = 2048  # rows a record batch of a plain column holds at most: a worker's first chunk waits for one
PAGE_BUFFER = 1 << 20  # bytes read ahead of a plain column's pages (pyarrow's buffer_size): a page at a time


def read(m: Members) -> Iterator:
    """The images' bytes (or ImageError each) of ``m``, by a Reader of this call alone (a worker keeps one for
    all its chunks: sources.Readers, through ``reader``)."""
    return Reader().read(m)


def reader() -> Reader:
    """What a worker keeps open between the chunks it reads (sources.Readers makes it at its first chunk)."""
    return Reader()


class Reader:
    """What a worker keeps open between the chunks it reads: its Parquet files, and the record batches of the
    row group being read, read on as its rows are asked for in order (a chunk's rows most often follow the last
    chunk's in the same group). One per worker process (sources.Readers, made by the pool's initializer); the
    report makes one for its draws."""

    def __init__(self) -> None:
        # (path, column asked) -> (ParquetFile, the same with dictionaries kept encoded, column, groups' first rows)
        self.files: dict[tuple, tuple] = {}
        self.batches: tuple[tuple, _Batches] | None = None  # ((path, column, group), its batches)

    def close(self) -> None:
        self.files.clear()
        self.batches = None

    def read(self, m: Members) -> Iterator:
        """The images' bytes (or ImageError each), one at a time, from record batches of their row groups."""
        opened = self._open(m)
        if isinstance(opened, ImageError):
            yield from itertools.repeat(opened, len(m.keys))
            return
        pf, pfd, column, starts = opened
        rows = np.asarray(m.keys, np.int64)
        if not len(rows):
            return
        ordered = bool((np.diff(rows) > 0).all())  # as the walk makes them: each batch's rows in one run
        groups = np.searchsorted(starts, rows, side="right") - 1
        cuts = [0, *(np.flatnonzero(np.diff(groups)) + 1).tolist(), len(rows)]  # runs of rows in one row group
        for a, b in itertools.pairwise(cuts):
            g = int(groups[a])
            if g == len(starts) - 1:  # past the file's last row: it was replaced by a shorter one since the walk
                yield from itertools.repeat(ImageError(f"no such row: the file holds {starts[-1]:,} rows now"), b - a)
                continue
            key = (m.container, column[0], g)
            if self.batches is None or self.batches[0] != key:
                self.batches = None  # the group before goes before the next is read
                self.batches = (key, _Batches(pf, pfd, column, g))
            yield from _rows_of(self.batches[1], rows[a:b] - starts[g], ordered)

    def _open(self, m: Members) -> tuple | ImageError:
        """(the file, the same with its image column's dictionary kept encoded, the column, the first row of
        each group and the row count after them), opened once; an ImageError where it cannot be now."""
        if (m.container, m.column) not in self.files:
            import pyarrow as pa

            try:
                pf, column = _open(m.container, m.column)
                leaf = f"{column[0]}.bytes" if column[1] else column[0]
                # a plain column's batches read a page at a time, not the whole column chunk first (pre_buffer)
                plain = _pq().ParquetFile(m.container, pre_buffer=False, buffer_size=PAGE_BUFFER)
                pfd = _pq().ParquetFile(m.container, read_dictionary=[leaf])  # _Batches: a dictionary's values once
            except (UserError, OSError, pa.ArrowException) as e:  # the walk read it: damaged or replaced since
                return ImageError(f"cannot read the file now: {first_line(e)}")
            groups = pf.metadata.num_row_groups
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(groups)])
            self.files[m.container, m.column] = (plain, pfd, column, starts)
        return self.files[m.container, m.column]


def _rows_of(batches: _Batches, rows: np.ndarray, ordered: bool) -> Iterator:
    """The images of ``rows`` (of one row group), a run of them per batch that holds them."""
    i = 0
    while i < len(rows):
        start, count = batches.at(int(rows[i]))
        if isinstance(count, ImageError):
            yield from itertools.repeat(count, len(rows) - i)
            return
        j = i + 1 + int(np.searchsorted(rows[i + 1:], start + count)) if ordered else i + 1
        yield from [_value(v) for v in batches.pick(rows[i:j] - start)]
        i = j


class _Batches:
    """Row group ``g``'s images, read on as its rows are asked for in order (from its start again for a row
    before the batch held), a record batch at a time: of a plain column, BATCH_ROWS rows at most and about
    CHUNK_BYTES (by the footer's size), its rows' bytes made only for the rows asked for (two workers take
    turns at the chunks of one big group: each makes its own); of a column chunk with a dictionary page, the
    whole group where it is CHUNK_BYTES or less (small batches of a dictionary column are slow: pyarrow
    encodes the plain pages after it again), else record batches of about CHUNK_BYTES, read with the dictionary
    kept encoded (``pfd``): a dictionary may hold one 20 MiB value that 60 rows point at (a 902-byte file,
    1.26 GB decoded); each row's value is looked up in it, never the rows decoded together. A batch that cannot
    be read is an ImageError for each row from it on."""

    def __init__(self, pf, pfd, column: tuple[str, bool], g: int) -> None:
        group = pf.metadata.row_group(g)
        leaf = f"{column[0]}.bytes" if column[1] else column[0]
        chunk = next((group.column(i) for i in range(group.num_columns)
                      if group.column(i).path_in_schema == leaf), None)
        encoded = max(1, chunk.total_uncompressed_size if chunk is not None else 1)
        self.dictionary = chunk is not None and chunk.has_dictionary_page
        self.pf = pfd if self.dictionary else pf
        self.column, self.g, self.rows = column, g, group.num_rows
        self.size = max(1, int(self.rows * min(1.0, CHUNK_BYTES / encoded)))  # rows a batch holds
        if not self.dictionary:
            self.size = min(self.size, BATCH_ROWS)
        self._restart()

    def _restart(self) -> None:
        # one thread: a worker per core is the pipeline's design, and pyarrow's pool would add one per core
        if self.size >= self.rows:  # a dictionary column's group at once: its batches would be slower
            self.it = (self.pf.read_row_group(self.g, columns=[self.column[0]], use_threads=False).column(0)
                       .combine_chunks()
                       for _ in range(1))
        else:
            self.it = (b.column(0) for b in self.pf.iter_batches(batch_size=self.size, row_groups=[self.g],
                                                                 columns=[self.column[0]], use_threads=False))
        self.start, self.values, self.error = 0, [], None

    def at(self, r: int) -> tuple[int, int | ImageError]:
        """(the first row of the batch that holds row ``r``, how many rows that batch holds; or the ImageError of
        every row from the one that could not be read on)."""
        import pyarrow as pa

        if r < self.start:
            self._restart()
        while self.error is None and r >= self.start + len(self.values):
            self.start += len(self.values)
            self.values = []  # the batch before goes before the next is read
            try:
                col = next(self.it)
                col = col.field("bytes") if self.column[1] else col
                # a dictionary's values by row at once: each a reference to the dictionary's own bytes
                self.values = _values(col) if pa.types.is_dictionary(col.type) else col
            except StopIteration:
                self.error = ImageError(f"row group {self.g} has no row {r}")
            except (pa.ArrowException, OSError, ValueError) as e:
                self.error = ImageError(f"cannot read row group {self.g} of the file: {first_line(e)}")
        return (r, self.error) if self.error is not None else (self.start, len(self.values))

    def pick(self, rows: np.ndarray) -> list:
        """The bytes (None where null) of ``rows`` of the batch held, counted from its first row: the rows
        asked for only (a run of rows, a slice; else taken one by one)."""
        if isinstance(self.values, list):
            return [self.values[r] for r in rows.tolist()]
        if rows[-1] - rows[0] + 1 == len(rows):
            return self.values.slice(int(rows[0]), len(rows)).to_pylist()
        return [self.values[r].as_py() for r in rows.tolist()]


def _values(col) -> list:
    """A dictionary batch's image bytes by row (None where null), looked up in its dictionary: each row the
    dictionary's own bytes object (the rows never decoded apart: 60 rows of one 20 MiB value hold 20 MiB)."""
    dictionary = col.dictionary.to_pylist()
    values = [dictionary[i] for i in col.indices.fill_null(0).to_numpy(zero_copy_only=False).tolist()]
    if col.null_count:
        for i in np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False)).tolist():
            values[i] = None
    return values


def _value(data) -> bytes | ImageError:
    if data is None:
        return ImageError("no image bytes in this row (null)")
    if len(data) > MAX_FILE_BYTES:
        return ImageError(f"image too large ({len(data)} bytes, limit {MAX_FILE_BYTES})")
    return data


def read_many(path: str, wanted: Sequence[str],
              image_column: str | None = None) -> Iterator[tuple[str, bytes | ImageError]]:
    """(name, bytes or ImageError) of each row named ``row/N`` in ``wanted``, once, in row order (each row group
    read once): the report's draws from one file. A name that is no row: an ImageError."""
    total = _open(path, image_column)[0].metadata.num_rows
    rows: dict[int, str] = {}
    for name in dict.fromkeys(wanted):
        row = name.removeprefix("row/")
        if name.startswith("row/") and row.isascii() and row.isdigit() and int(row) < total:
            rows[int(row)] = name
        else:
            yield name, ImageError(f"no row {name!r} (rows are named row/N, N from 0 to {total - 1})")
    order = sorted(rows)
    names = [rows[r] for r in order]
    # one read of them all, in row order: each row group read once
    found = read(Members("parquet", path, names, order, [-1] * len(order), column=image_column))
    yield from zip(names, found, strict=True)
