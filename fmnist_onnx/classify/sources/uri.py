"""The URI source: files and folders in an object store or any file system pyarrow knows (``s3://``, ``gs://``,
``hdfs://``, ``file://``), listed and read through pyarrow's file systems. Read by the Ray engine's actors.
The unit of work is a file's URI."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from fmnist_onnx import images
from fmnist_onnx.classify.contract import Batch, Found
from fmnist_onnx.errors import UserError
from fmnist_onnx.text import first_line


def _uri_fs(uri: str):
    """(pyarrow file system, path inside it) for a URI, or UserError."""
    import pyarrow as pa
    from pyarrow import fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UserError(f"{uri}: {first_line(e)}") from None


def check(uris: Sequence[str]) -> list[str]:
    """Every URI must exist; UserError otherwise."""
    from pyarrow import fs as pafs

    for uri in uris:
        filesystem, base = _uri_fs(uri)
        try:
            info = filesystem.get_file_info(base)
        except OSError as e:
            raise UserError(f"{uri}: {first_line(e)}") from None
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"{uri}: no such file or folder")
    return list(uris)


def _iter_uri(uri: str, recursive: bool, exts: frozenset[str]) -> Iterator[Found]:
    """folder.iter_files for one URI: the named file, or the files under the named folder (sorted)."""
    from pyarrow import fs as pafs

    filesystem, base = _uri_fs(uri)
    prefix = uri.partition("://")[0] + "://"
    info = filesystem.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        yield Found(prefix + base, "file")  # named explicitly: an input, whatever its suffix
        return
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=recursive))
    except OSError as e:
        yield Found(uri, "unlistable", f"cannot list folder: {first_line(e)}")
        return
    named, unnamed = [], 0
    for i in infos:
        if i.type == pafs.FileType.Directory:
            continue
        try:
            named.append(i.path)
        except UnicodeDecodeError:  # a local file name that is not UTF-8: pyarrow cannot give it
            unnamed += 1
    for path in sorted(named):
        kind = "file" if os.path.splitext(path)[1].lower() in exts else "skip"
        yield Found(prefix + path, kind)
    for n in range(unnamed):
        yield Found(f"{uri.rstrip('/')}/<file name {n + 1} that is not UTF-8>", "unlistable",
                           "file name is not UTF-8: pyarrow cannot read it (give the folder as a plain path)")


def walk_batches(uris: Sequence[str], recursive: bool, exclude: Sequence[str] = ()) -> Iterator[Batch]:
    """Every entry under ``uris``, an entry at a time (the cluster, not this process, sets the pace here).
    ``exclude`` names local files only: nothing a run writes is in an object store."""
    exts = images.image_extensions()
    for uri in uris:
        for f in _iter_uri(uri, recursive, exts):
            if f.kind == "unlistable":
                yield Batch([], [], f)
            else:
                yield Batch([f.path], []) if f.kind == "file" else Batch([], [f.path])


def read_uri(filesystem, path: str) -> bytes:
    """images.read_file for a path in a pyarrow file system."""
    try:
        with filesystem.open_input_file(path) as f:
            size = f.size()
            if size > images.MAX_FILE_BYTES:
                raise images.ImageError(f"file too large ({size} bytes, limit {images.MAX_FILE_BYTES})")
            data = f.read()
    except images.ImageError:
        raise
    except FileNotFoundError:
        raise images.ImageError("file not found") from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises OSError and ArrowException subclasses
        raise images.ImageError(f"cannot read: {first_line(e)}") from None
    if not data:
        raise images.ImageError("empty file")
    return data
