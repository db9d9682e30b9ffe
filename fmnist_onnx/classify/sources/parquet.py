"""The Parquet source: tables with a column of encoded images, the layout of the image datasets on the Hugging
Face Hub (an ``image`` struct of ``bytes`` and ``path``, a ``label`` whose class names are in the schema's
``huggingface`` metadata), or any table with one column of image bytes; or the column named by
``--image-column`` (``image_column``: a binary column, or a struct with a binary ``bytes`` field). Rows are
named ``<file>::row/<N>`` (N from 0, in the file's order).

The walk (this process) reads the metadata and the label column only; the workers read the image column a
row group at a time (the last one kept: chunks and row groups need not line up), so memory is bounded by the
row group, and a row group bigger than MAX_GROUP_BYTES is refused as error rows rather than read. A row group
that cannot be read (a damaged file) gives its rows error rows; the run goes on."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from fmnist_onnx.classify.contract import Batch, Members
from fmnist_onnx.classify.sources import members
from fmnist_onnx.errors import UserError
from fmnist_onnx.images import MAX_FILE_BYTES, ImageError
from fmnist_onnx.spec import CLASSES
from fmnist_onnx.text import first_line, visible

log = logging.getLogger(__name__)

MAX_GROUP_BYTES = 1 << 30  # a row group's image column, uncompressed, read at once by a worker
_files: dict[tuple, tuple] = {}  # per process: (path, column asked) -> (ParquetFile, column, first row of groups)
_group: dict[tuple, list] = {}  # per process: the last row group read: (path, column, group) -> images


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
    except (KeyError, TypeError, ValueError):
        return None
    return names if isinstance(names, list) and len(names) <= 100_000 else None


def _open(path: str, name: str | None = None):
    pq = _pq()
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{visible(path)}: not a readable Parquet file ({first_line(e)})") from None
    try:
        return pf, image_column(pf.schema_arrow, name)
    except UserError as e:
        raise UserError(f"{visible(path)}: {e}") from None


def check(paths: Sequence[str], image_column: str | None = None) -> list[str]:
    members.check_files(paths, "Parquet")
    for p in paths:
        _open(p, image_column)
    return list(paths)


def walk_batches(paths: Sequence[str], recursive: bool = True, exclude: Sequence[str] = (),
                 image_column: str | None = None) -> Iterator[Batch]:
    """A Batch per row group: its rows' units, their row numbers, and their true classes; the Members carry
    ``image_column`` to the workers that read them."""
    for path in paths:
        pf, _ = _open(path, image_column)
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
    idx = np.array([-1 if v is None else v for v in values], np.int64)
    inside = (idx >= 0) & (idx < len(lookup))
    return np.where(inside, lookup[np.clip(idx, 0, len(lookup) - 1)], -1).tolist()


# ---------------------------------------------------------------------------------------------- in a worker

def read(m: Members) -> list:
    """The images' bytes (or ImageError each), a row group at a time."""
    if (m.container, m.column) not in _files:
        pf, column = _open(m.container, m.column)
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
        _files[m.container, m.column] = (pf, column, starts)
    pf, column, starts = _files[m.container, m.column]
    rows = np.asarray(m.keys, np.int64)
    if not len(rows):
        return []
    groups = np.searchsorted(starts, rows, side="right") - 1
    cuts = [0, *(np.flatnonzero(np.diff(groups)) + 1).tolist(), len(rows)]  # runs of rows in one row group
    out: list = []
    for a, b in itertools.pairwise(cuts):
        g = int(groups[a])
        group = _read_group(m.container, pf, column, g)
        if isinstance(group, ImageError):
            out += [group] * (b - a)
        else:
            out += [_value(group[r]) for r in (rows[a:b] - starts[g]).tolist()]
    return out


def _read_group(path: str, pf, column: tuple[str, bool], g: int) -> list | ImageError:
    import pyarrow as pa

    key = (path, column[0], g)
    if key not in _group:
        _group.clear()
        size = pf.metadata.row_group(g).total_byte_size
        if size > MAX_GROUP_BYTES:
            _group[key] = ImageError(f"row group {g} holds {size:,} bytes, more than {MAX_GROUP_BYTES:,} to read "
                                     "at once")
            return _group[key]
        name, struct = column
        try:
            # one thread: a worker per core is the pipeline's design, and pyarrow's pool would add one per core
            col = pf.read_row_group(g, columns=[name], use_threads=False).column(0).combine_chunks()
            _group[key] = (col.field("bytes") if struct else col).to_pylist()
        except (pa.ArrowException, OSError, ValueError) as e:
            _group[key] = ImageError(f"cannot read row group {g} of the file: {first_line(e)}")
    return _group[key]


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
