"""The sources' registry: where images come from, a module per kind of input (contract.Source), imported only
when an input of its kind is named. A source is chosen by what the input is: ``uri`` for ``scheme://...``,
``folder`` for local files and folders.

Adding a source: a module here with ``check`` and ``walk_batches`` (contract.Source), an entry in SOURCES, a
test in ``kind_of`` for its inputs, and its name in the sources of each engine that reads it
(engines/__init__.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from importlib import import_module
from itertools import groupby

from fmnist_onnx.classify.contract import Batch
from fmnist_onnx.errors import UserError
from fmnist_onnx.text import visible

SOURCES: dict[str, str] = {
    "folder": "fmnist_onnx.classify.sources.folder",
    "uri": "fmnist_onnx.classify.sources.uri",
}


def is_uri(path: str) -> bool:
    """'s3://bucket/x', 'gs://...', 'file:///...': read through pyarrow's file systems."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.isascii() and scheme.replace("+", "").replace("-", "").isalnum() and len(scheme) > 1


def kind_of(path: str) -> str:
    """The source that reads ``path``."""
    return "uri" if is_uri(path) else "folder"


def source(kind: str):
    """The module of source ``kind`` (contract.Source)."""
    return import_module(SOURCES[kind])


def check_inputs(paths: Sequence[str], readable: Sequence[str], engine: str) -> list[str]:
    """The inputs, each checked by its source before any work; one a chosen engine cannot read (``readable``:
    its sources) is a UserError naming the engines that can."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise UserError("no PATH given: name folders or image files to classify")
    for p in paths:
        kind = kind_of(p)
        if kind not in readable:
            raise UserError(f"{visible(p)}: no such file or folder (a {kind} input: --engine {engine} reads "
                            f"{' and '.join(readable)} inputs; --engine ray reads URIs)")
    for kind in dict.fromkeys(map(kind_of, paths)):
        source(kind).check([p for p in paths if kind_of(p) == kind])
    return list(paths)


def walk(roots: Sequence[str], recursive: bool, exclude: Sequence[str] = ()) -> Iterator[Batch]:
    """Every unit under ``roots``, in the order they are named: consecutive inputs of one source walked by
    it together (a folder reached twice is walked once)."""
    for kind, group in groupby(roots, key=kind_of):
        yield from source(kind).walk_batches(list(group), recursive, exclude)
