"""A Fashion-MNIST split as the files other tools load directly, beside images.export_png's ImageFolder layout:

- ``tar``: WebDataset shards ``<out>/<split>-000000.tar``, ``-000001.tar``... of ``shard_size`` images each. A
  sample is two members with one key, the image's index: ``00042.png`` (the bytes export_png writes) and
  ``00042.cls`` (the class index in ASCII digits, no newline). Members are ustar entries with mtime 0, uid/gid 0,
  no owner names and mode 0o644, so two exports are the same bytes.
- ``parquet``: Hugging Face's layout, one file ``<out>/<split>-00000-of-00001.parquet`` with the columns
  ``image`` struct<bytes: binary, path: string> and ``label`` int64, and the ``huggingface`` schema metadata that
  ``datasets`` writes itself (Image and ClassLabel features, the class names), so ``load_dataset`` gives
  PIL images and named labels. Row groups of ``row_group_size`` images, written one at a time.

Every file is written whole under a temporary name and then given its own (files.atomic_write): a killed
export leaves no half shard under a final name. Existing outputs are refused without ``overwrite``.
No torch here: the pixels come in as numpy.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fmnist_onnx.errors import UserError
from fmnist_onnx.files import atomic_write, check_output
from fmnist_onnx.images import encode_png, png_name
from fmnist_onnx.spec import CLASSES

log = logging.getLogger(__name__)

SHARD_SIZE = 10_000  # WebDataset's advice is shards of 100 MB or more; ~3.5 MB here, but 6 for the train split
ROW_GROUP_SIZE = 1_000  # ~350 KB of PNGs: a reader that wants a few rows decodes little


@dataclass
class Written:
    """What an export wrote: its files in order, the images in them, and the shards of an earlier export that
    this one replaced and removed (``overwrite`` only)."""
    files: list[Path]
    images: int
    removed: list[Path] = field(default_factory=list)


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def parquet_name(split: str) -> str:
    return f"{split}-00000-of-00001.parquet"


def _prepare(out: Path, names: Sequence[str], overwrite: bool) -> list[Path]:
    """The output folder, made where missing (never a link), and the files to write in it, each checked."""
    if os.path.islink(out) or (out.exists() and not out.is_dir()):
        raise UserError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return [check_output(out / n, overwrite) for n in names]


def _bar(total: int, desc: str, progress: bool):
    from fmnist_onnx.progress import bar

    return bar(desc, enabled=progress, total=total, unit="img", noun="images")


# ---------------------------------------------------------------------------------------------- WebDataset

def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_shard(f: BinaryIO, pixels: np.ndarray, labels: Sequence[int], start: int, count: int) -> None:
    """One shard's samples, ``start`` being the index of its first image in the split of ``count``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (img, label) in enumerate(zip(pixels, labels, strict=True), start):
            key = png_name(i, count)[:-len(".png")]
            _member(tar, f"{key}.png", encode_png(img, buf))
            _member(tar, f"{key}.cls", str(int(label)).encode("ascii"))


def _old_shards(out: Path, split: str) -> list[Path]:
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
    return sorted(p for p in out.iterdir() if pattern.fullmatch(p.name) and (p.is_symlink() or not p.is_dir()))


def export_tar(pixels: np.ndarray, labels: Sequence[int], out: str | Path, split: str,
               shard_size: int = SHARD_SIZE, overwrite: bool = False, progress: bool = False) -> Written:
    """Write uint8 images [N, 28, 28] as WebDataset shards in ``out`` (see the module doc). Without
    ``overwrite`` any shard of ``split`` already there is refused, before anything is written; with it, the
    shards are replaced and those of an earlier, longer export removed (a glob would pick them up)."""
    if shard_size < 1:
        raise UserError(f"the shard size must be at least 1 (got {shard_size})")
    out, n = Path(out), len(pixels)
    starts = range(0, n, shard_size)
    paths = _prepare(out, [shard_name(split, s) for s in range(len(starts))], overwrite)
    old = _old_shards(out, split)
    if old and not overwrite:
        raise UserError(f"{out} holds shards of an earlier export ({old[0].name}); use --overwrite to replace them")
    bar = _bar(n, "export tar", progress)
    for path, start in zip(paths, starts, strict=True):
        stop = min(n, start + shard_size)
        atomic_write(path, lambda f, a=start, b=stop: _write_shard(f, pixels[a:b], labels[a:b], a, n), overwrite)
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    removed = [p for p in old if p not in paths]
    for p in removed:
        p.unlink(missing_ok=True)
        log.info("removed %s, a shard of an earlier export", p)
    return Written(paths, n, removed)


# ---------------------------------------------------------------------------------------------- Parquet

def hf_schema():
    """The Arrow schema of the Parquet file, with the metadata ``datasets`` writes for these features
    (``Features({"image": Image(), "label": ClassLabel(names=CLASSES)})``, checked against datasets 5.2)."""
    import pyarrow as pa

    features = {"image": {"_type": "Image"}, "label": {"names": list(CLASSES), "_type": "ClassLabel"}}
    image = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    return pa.schema([pa.field("image", image), pa.field("label", pa.int64())],
                     metadata={"huggingface": json.dumps({"info": {"features": features}})})


def _write_parquet(f: BinaryIO, pixels: np.ndarray, labels: Sequence[int], rows: int, bar) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, n, buf = hf_schema(), len(pixels), io.BytesIO()
    with pq.ParquetWriter(f, schema) as writer:
        for start in range(0, max(n, 1), rows):  # an empty split still gets its columns
            stop = min(n, start + rows)
            pngs = [encode_png(img, buf) for img in pixels[start:stop]]
            names = [png_name(i, n) for i in range(start, stop)]
            image = pa.StructArray.from_arrays([pa.array(pngs, pa.binary()), pa.array(names, pa.string())],
                                               fields=list(schema.field("image").type))
            label = pa.array(np.asarray(labels[start:stop], dtype=np.int64), pa.int64())
            writer.write_table(pa.Table.from_arrays([image, label], schema=schema))  # one row group
            if bar is not None:
                bar.update(stop - start)


def export_parquet(pixels: np.ndarray, labels: Sequence[int], out: str | Path, split: str,
                   row_group_size: int = ROW_GROUP_SIZE, overwrite: bool = False, progress: bool = False) -> Written:
    """Write uint8 images [N, 28, 28] as ``out/<split>-00000-of-00001.parquet`` (see the module doc), row
    group by row group into a temporary file that then takes the name."""
    if row_group_size < 1:
        raise UserError(f"the row group size must be at least 1 (got {row_group_size})")
    try:
        import pyarrow.parquet  # noqa: F401 - said before any work, in one line
    except ImportError:
        raise UserError("--format parquet needs pyarrow: pip install pyarrow (or fmnist-onnx[parquet])") from None
    (path,) = _prepare(Path(out), [parquet_name(split)], overwrite)
    bar = _bar(len(pixels), "export parquet", progress)
    try:
        atomic_write(path, lambda f: _write_parquet(f, pixels, labels, row_group_size, bar), overwrite)
    finally:
        if bar is not None:
            bar.close()
    return Written([path], len(pixels))
