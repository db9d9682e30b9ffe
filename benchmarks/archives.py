"""fmnist_onnx.archives against Python's tarfile and zipfile, on a WebDataset-style shard of the train split.

    python benchmarks/archives.py              # 60,000 PNGs + 60,000 .cls sidecars, about half a minute

The tar, its .tar.gz and a zip of the same members are written to a temporary folder once (nothing is kept).
Timed, best of --repeats, on a warm page cache, in microseconds per member: listing (index_tar against
``tarfile.getmembers``), reading every member's bytes (read_tar's pread against ``extractfile().read()`` on an
open TarFile; read_zip against ``ZipFile.read``) and the one streaming pass over the .tar.gz (iter_tar_stream
against ``tarfile.open("r|gz")``). Prints a JSON object; writes nothing else.

    python benchmarks/archives.py --writers     # index_tar on the same shard as each writer writes it

``--writers``: the same members written by each tool users have (Python's tarfile in its default pax format from
files on disk, as ``tar.add`` does: an 'x' header before every member for the fractional mtime; tarfile's GNU
format; WebDataset's TarWriter; GNU tar --format=gnu and --format=posix of the folder; bsdtar), and index_tar
timed on each (CPU time of the process: the parent's own cost), best of --repeats, in microseconds per image
(an image is two members: its PNG and its .cls), with the listing checked against tarfile's.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from fmnist_onnx import archives
from fmnist_onnx.data import DEBIAN_DIR


def train_split(count: int) -> tuple[np.ndarray, np.ndarray]:
    raw = gzip.open(DEBIAN_DIR / "train-images-idx3-ubyte.gz").read()
    labels = gzip.open(DEBIAN_DIR / "train-labels-idx1-ubyte.gz").read()
    return (np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:count],
            np.frombuffer(labels, np.uint8, offset=8)[:count])


def shard_members(count: int) -> list[tuple[str, bytes]]:
    """WebDataset's layout: 00012.png and its 00012.cls sidecar, for the first ``count`` train images."""
    pixels, labels = train_split(count)
    members = []
    for i, (img, label) in enumerate(zip(pixels, labels, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        members += [(f"{i:05d}.png", buf.getvalue()), (f"{i:05d}.cls", str(int(label)).encode())]
    return members


def write_shards(folder: Path, count: int) -> list[tuple[str, bytes]]:
    members = shard_members(count)
    for name, mode in (("shard.tar", "w"), ("shard.tar.gz", "w:gz")):
        with tarfile.open(folder / name, mode, format=tarfile.GNU_FORMAT) as tf:
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(folder / "shard.zip", "w", zipfile.ZIP_STORED) as zf:
        for member, data in members:
            zf.writestr(member, data)
    return members


WRITERS = ("tarfile_gnu", "tarfile_pax", "webdataset", "gnutar_gnu", "gnutar_posix", "bsdtar")


def write_files(folder: Path, members: list[tuple[str, bytes]]) -> Path:
    """The members as files in ``folder/shard`` (what the command-line tools archive), fractional mtimes."""
    root = folder / "shard"
    root.mkdir(parents=True, exist_ok=True)
    for name, data in members:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_with(writer: str, out: Path, root: Path, names: list[str]) -> Path:
    """The files ``names`` under ``root`` archived into ``out`` by ``writer`` (one of WRITERS), in that order,
    named as they are under ``root``."""
    if writer in ("tarfile_gnu", "tarfile_pax"):
        fmt = tarfile.GNU_FORMAT if writer == "tarfile_gnu" else tarfile.PAX_FORMAT
        with tarfile.open(out, "w", format=fmt) as tf:
            for name in names:
                tf.add(root / name, name)
    elif writer == "webdataset":
        from webdataset import TarWriter

        with TarWriter(str(out)) as sink:
            for name in names:
                key, _, ext = name.rpartition(".")
                if ext == "png":
                    cls = root / f"{key}.cls"
                    sink.write({"__key__": key, "png": (root / name).read_bytes(),
                                **({"cls": cls.read_bytes()} if cls.exists() else {})})
    elif writer.startswith("gnutar_") or writer == "bsdtar":  # the names from a list (-T), as a shard is made
        listing = out.with_name(out.name + ".list")
        listing.write_text("".join(name + "\n" for name in names))
        tool = ["tar", f"--format={writer[7:]}"] if writer.startswith("gnutar_") else ["bsdtar"]
        subprocess.run([*tool, "-cf", out, "-C", root, "-T", listing], check=True)
        listing.unlink()
    else:
        raise ValueError(writer)
    return out


def tarfile_listing(path: Path) -> list[str]:
    """The members that get a row: tarfile's regular files and hard or symbolic links to one."""
    with tarfile.open(path) as tf:
        return [m.name for m in tf.getmembers() if m.isreg() or m.islnk() or m.issym()]


def measure_writers(folder: Path, members: list[tuple[str, bytes]], repeats: int) -> dict:
    root = write_files(folder, members)
    names = [name for name, _ in members]
    images = sum(name.endswith(".png") for name in names)
    out: dict = {"images": images, "index_tar_us_per_image": {}, "tar_mb": {}}
    for writer in WRITERS:
        if writer == "bsdtar" and not shutil.which("bsdtar"):
            continue
        path = write_with(writer, folder / f"{writer}.tar", root, names)
        t, index = best(lambda p=path: archives.index_tar(str(p)), repeats, time.process_time)  # the parent's CPU
        assert index.names == tarfile_listing(path) and index.damage is None, writer
        out["index_tar_us_per_image"][writer] = round(t / images * 1e6, 2)
        out["tar_mb"][writer] = round(path.stat().st_size / 1e6, 1)
        os.unlink(path)
    return out


def best(fn, repeats: int, clock=time.perf_counter) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = clock()
        result = fn()
        times.append(clock() - start)
    return min(times), result


def tarfile_read(path: Path) -> list[bytes]:
    with tarfile.open(path) as tf:
        return [tf.extractfile(m).read() for m in tf.getmembers() if m.isreg()]


def zipfile_read(path: str) -> list[bytes]:
    with zipfile.ZipFile(path) as zf:
        return [zf.read(info) for info in zf.infolist()]


def measure(folder: Path, members: list[tuple[str, bytes]], repeats: int) -> dict:
    n, tar, tgz, zpath = len(members), *(str(folder / f"shard.{ext}") for ext in ("tar", "tar.gz", "zip"))
    want = [data for _, data in members]
    t_index, index = best(lambda: archives.index_tar(tar), repeats)
    t_tf_index, _ = best(lambda: tarfile.open(tar).getmembers(), repeats)
    t_read, got = best(lambda: archives.read_tar(tar, index.offsets, index.sizes), repeats)
    t_tf_read, _ = best(lambda: tarfile_read(Path(tar)), repeats)
    t_stream, streamed = best(lambda: list(archives.iter_tar_stream(tgz)), repeats)
    t_tf_stream, _ = best(lambda: [m.name for m in tarfile.open(tgz, "r|gz")], repeats)
    t_zindex, zindex = best(lambda: archives.index_zip(zpath), repeats)
    t_zread, zgot = best(lambda: archives.read_zip(zpath, zindex.offsets), repeats)
    t_zf_read, _ = best(lambda: zipfile_read(zpath), repeats)
    assert index.names == [m for m, _ in members] and got == want and zgot == want
    assert [d for _, d in streamed] == want
    us = lambda t: round(t / n * 1e6, 2)  # noqa: E731
    return {"members": n, "tar_bytes": Path(tar).stat().st_size,
            "index_tar_us": us(t_index), "tarfile_getmembers_us": us(t_tf_index),
            "read_tar_us": us(t_read), "tarfile_extract_read_us": us(t_tf_read),
            "iter_tar_stream_tgz_us": us(t_stream), "tarfile_stream_tgz_list_only_us": us(t_tf_stream),
            "index_zip_us": us(t_zindex), "read_zip_us": us(t_zread), "zipfile_read_us": us(t_zf_read),
            "index_tar_total_s": round(t_index, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=60_000, help="images (each with a .cls sidecar)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--writers", action="store_true", help="index_tar on each writer's tar of the shard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.writers:
            print(json.dumps(measure_writers(Path(tmp), shard_members(args.count), args.repeats), indent=1))
            return
        members = write_shards(Path(tmp), args.count)
        print(json.dumps(measure(Path(tmp), members, args.repeats), indent=1))


if __name__ == "__main__":
    main()
