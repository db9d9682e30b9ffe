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
export leaves no half shard under a final name. Existing outputs are refused without ``overwrite``. A file that
cannot be written (a full disk, an I/O error) ends the export with one line, exit 4 (files.OutputError), and
nothing of it left: no temporary file, no shard of this export.

The tar shards an export wrote are listed in ``<out>/<split>.manifest.json`` (name, size and SHA-256 of each,
rewritten atomically after each shard), so that ``overwrite`` removes the shards of an earlier, longer export
and nothing else: a file at a shard's name that no manifest lists (a user's own, a FIFO), or whose size or hash
no longer match, is left alone and named. The manifest is read back as untrusted input: bounded, never through
a link, every field checked; one that fails is not used (nothing is removed), with a warning.
No torch here: the pixels come in as numpy.
"""

from __future__ import annotations

import hashlib
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
from fmnist_onnx.files import OutputError, atomic_write, atomic_write_text, check_output, open_existing
from fmnist_onnx.images import encode_png, png_name
from fmnist_onnx.spec import CLASSES
from fmnist_onnx.text import visible

log = logging.getLogger(__name__)

SHARD_SIZE = 10_000  # WebDataset's advice is shards of 100 MB or more; ~3.5 MB here, but 6 for the train split
ROW_GROUP_SIZE = 1_000  # ~350 KB of PNGs: a reader that wants a few rows decodes little
MANIFEST_MAX_BYTES = 1 << 22  # ~100 bytes a shard: 40,000 shards; a bigger file is not one an export wrote


@dataclass
class Written:
    """What an export wrote: its files in order, the images in them, and the shards of an earlier export that
    this one replaced and removed (``overwrite`` only)."""
    files: list[Path]
    images: int
    removed: list[Path] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)  # shard names left alone, and why


@dataclass(frozen=True)
class Shard:
    """A shard as an export wrote it (a manifest's entry)."""
    name: str
    size: int
    sha256: str


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


class _Hashing:
    """A file that hashes what goes through it: a shard's size and SHA-256 for the manifest, without reading
    the shard back."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.f.write(data)
        self.hash.update(data)
        self.size += memoryview(data).nbytes
        return memoryview(data).nbytes

    def tell(self) -> int:
        return self.size


def _write_shard(f: BinaryIO, pixels: np.ndarray, labels: Sequence[int], start: int, count: int) -> None:
    """One shard's samples, ``start`` being the index of its first image in the split of ``count``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (img, label) in enumerate(zip(pixels, labels, strict=True), start):
            key = png_name(i, count)[:-len(".png")]
            _member(tar, f"{key}.png", encode_png(img, buf))
            _member(tar, f"{key}.cls", str(int(label)).encode("ascii"))


def _shard_pattern(split: str) -> re.Pattern:
    return re.compile(rf"{re.escape(split)}-[0-9]{{6}}\.tar")


def _old_shards(out: Path, split: str) -> list[Path]:
    pattern = _shard_pattern(split)
    return sorted(p for p in out.iterdir() if pattern.fullmatch(p.name) and (p.is_symlink() or not p.is_dir()))


def manifest_path(out: str | Path, split: str) -> Path:
    return Path(out) / f"{split}.manifest.json"


def export_tar(pixels: np.ndarray, labels: Sequence[int], out: str | Path, split: str,
               shard_size: int = SHARD_SIZE, overwrite: bool = False, progress: bool = False) -> Written:
    """Write uint8 images [N, 28, 28] as WebDataset shards in ``out`` (see the module doc). Without
    ``overwrite`` any shard of ``split`` already there is refused, before anything is written; with it, the
    shards are replaced, and those of an earlier, longer export that its manifest lists, unchanged, removed (a
    glob would pick them up). OutputError (exit 4) where a file cannot be written: this export's shards go."""
    if shard_size < 1:
        raise UserError(f"the shard size must be at least 1 (got {shard_size})")
    out, n = Path(out), len(pixels)
    starts = range(0, n, shard_size)
    paths = _prepare(out, [shard_name(split, s) for s in range(len(starts))], overwrite)
    check_output(manifest_path(out, split), overwrite)  # a folder or a FIFO there: said before any work
    old = _old_shards(out, split)
    if old and not overwrite:
        raise UserError(f"{out} holds shards of an earlier export ({old[0].name}); use --overwrite to replace them")
    earlier = read_manifest(out, split)
    written: dict[str, Shard] = {}
    bar = _bar(n, "export tar", progress)
    path = paths[0] if paths else out
    try:
        for path, start in zip(paths, starts, strict=True):
            stop = min(n, start + shard_size)
            written[path.name] = _publish_shard(path, pixels[start:stop], labels[start:stop], start, n, overwrite)
            earlier.pop(path.name, None)  # replaced: no longer the earlier export's
            _write_manifest(out, split, {**earlier, **written})
            if bar is not None:
                bar.update(stop - start)
    except OSError as e:  # a full disk, an I/O error: none of this export stays
        _undo(out, split, earlier, written)
        gone = f"; the {len(written)} shards written before it were removed" if written else ""
        raise OutputError(f"cannot write {path}: {e.strerror or visible(e)}{gone}") from None
    finally:
        if bar is not None:
            bar.close()
    removed, kept = _remove_earlier(out, earlier, [p for p in old if p.name not in written])
    try:
        _write_manifest(out, split, written)
    except OSError as e:  # the one written after the last shard holds them all: its other entries are gone now
        log.warning("cannot rewrite %s: %s", manifest_path(out, split), e.strerror or e)
    return Written(paths, n, removed, kept)


def _publish_shard(path: Path, pixels: np.ndarray, labels: Sequence[int], start: int, count: int,
                   overwrite: bool) -> Shard:
    """One shard written under a temporary name and given ``path``'s: its manifest entry."""
    hashed: list[_Hashing] = []

    def write(f: BinaryIO) -> None:
        hashed.append(_Hashing(f))
        _write_shard(hashed[0], pixels, labels, start, count)

    atomic_write(path, write, overwrite)
    return Shard(path.name, hashed[0].size, hashed[0].hash.hexdigest())


def _undo(out: Path, split: str, earlier: dict[str, Shard], written: dict[str, Shard]) -> None:
    """After a failed write: the shards this export wrote go (those still as it wrote them), then the manifest
    says what remains of the earlier export (best effort: the disk may still be full)."""
    for shard in written.values():
        if _unchanged(out / shard.name, shard):
            (out / shard.name).unlink(missing_ok=True)
    try:
        _write_manifest(out, split, earlier)
    except OSError as e:
        log.warning("cannot rewrite %s: %s", manifest_path(out, split), e.strerror or e)


def _remove_earlier(out: Path, earlier: dict[str, Shard],
                    others: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The shards of an earlier export that this one did not replace: removed where its manifest lists them
    and they are as it wrote them (size, SHA-256); any other file at a shard's name is kept, with the reason."""
    removed: list[Path] = []
    kept: list[tuple[Path, str]] = []
    for path in others:
        shard = earlier.get(path.name)
        if shard is None:
            kept.append((path, "no earlier export of this tool wrote it (its manifest does not list it)"))
        elif not _unchanged(path, shard):
            kept.append((path, "changed since an earlier export wrote it (its size or SHA-256 differ)"))
        else:
            path.unlink(missing_ok=True)
            removed.append(path)
            log.info("removed %s, a shard of an earlier export", path)
    return removed, kept


def _unchanged(path: Path, shard: Shard) -> bool:
    """Whether the regular file at ``path`` (not a link, a FIFO...) has the size and SHA-256 of ``shard``, and
    is still the file at that name once hashed."""
    try:
        fd = open_existing(path)
    except (UserError, OSError):
        return False
    try:
        st = os.fstat(fd)
        if st.st_size != shard.size:
            return False
        h = hashlib.sha256()
        while block := os.read(fd, 1 << 20):
            h.update(block)
        now = os.lstat(path)
        return h.hexdigest() == shard.sha256 and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
    except OSError:
        return False
    finally:
        os.close(fd)


def _write_manifest(out: Path, split: str, shards: dict[str, Shard]) -> None:
    """The manifest of ``shards``, replaced atomically; none where there are none (a failed first export)."""
    if not shards:
        path = manifest_path(out, split)
        if os.path.islink(path) or os.path.isfile(path):
            path.unlink()
        return
    entries = [{"name": s.name, "size": s.size, "sha256": s.sha256} for s in sorted(shards.values(),
                                                                                    key=lambda s: s.name)]
    text = json.dumps({"split": split, "shards": entries}, indent=1) + "\n"
    atomic_write_text(manifest_path(out, split), text, overwrite=True)


def read_manifest(out: str | Path, split: str) -> dict[str, Shard]:
    """The shards an earlier export of ``split`` into ``out`` wrote, by name, as its manifest lists them: {}
    where there is none, or where it is not one an export wrote (a warning says so; nothing is removed)."""
    path = manifest_path(out, split)
    if not os.path.lexists(path):
        return {}
    try:
        return _parse_manifest(_read_bounded(path), split)
    except (UserError, OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        log.warning("%s not used (%s): the shards of an earlier export are kept", path, visible(why))
        return {}


def _read_bounded(path: Path) -> bytes:
    fd = open_existing(path)  # never through a link, only a regular file
    with os.fdopen(fd, "rb") as f:
        data = f.read(MANIFEST_MAX_BYTES + 1)
    if len(data) > MANIFEST_MAX_BYTES:
        raise ValueError(f"more than {MANIFEST_MAX_BYTES:,} bytes")
    return data


def _parse_manifest(data: bytes, split: str) -> dict[str, Shard]:
    """A manifest's shards, every field checked; ValueError naming what is wrong."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    if type(raw) is not dict or set(raw) != {"split", "shards"} or type(raw["shards"]) is not list:
        raise ValueError("expected the fields split and shards")
    if raw["split"] != split:
        raise ValueError(f"it lists shards of another split ({visible(repr(raw['split']))})")
    pattern, out = _shard_pattern(split), {}
    for i, e in enumerate(raw["shards"]):
        if (type(e) is not dict or set(e) != {"name", "size", "sha256"} or type(e["name"]) is not str
                or not pattern.fullmatch(e["name"]) or type(e["size"]) is not int or e["size"] < 0
                or type(e["sha256"]) is not str or not re.fullmatch("[0-9a-f]{64}", e["sha256"])):
            raise ValueError(f"shard {i} is not a name {split}-NNNNNN.tar with its size and SHA-256")
        if e["name"] in out:
            raise ValueError(f"{e['name']} is listed twice")
        out[e["name"]] = Shard(e["name"], e["size"], e["sha256"])
    return out


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
    group by row group into a temporary file that then takes the name. OutputError (exit 4) where it cannot be
    written: the temporary file goes, an earlier file at the name stays."""
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
    except OSError as e:  # a full disk, an I/O error (pyarrow's own: ArrowIOError is one); the temporary file went
        raise OutputError(f"cannot write {path}: {e.strerror or visible(e)}") from None
    finally:
        if bar is not None:
            bar.close()
    return Written([path], len(pixels))
