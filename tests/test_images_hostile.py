"""images.py on hostile files, through the real `classify` command: files that claim huge sizes, damaged and
fuzzed files, sideways photos. Every file gets exactly one row, the run ends normally, memory stays bounded."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_images import chunk, damaged_tiff, gray_png, hostile_pngs, jpeg_bytes

from fmnist_onnx import images
from fmnist_onnx.table import read_rows

# The whole process tree (classify and its workers) must stay under this, whatever a file claims. Measured on
# what landed: about 0.3 GB with a 64 Mpx file in the folder (one worker's decode + preprocess, 0.2 GB of it).
PEAK_RSS_LIMIT_MB = 1500


def classify_measured(paths: list[Path], model: Path, out: Path, *args: str) -> tuple[subprocess.CompletedProcess,
                                                                                         float]:
    """Run `fmnist-onnx classify` as a real process, under a small parent that reports, once it has exited,
    the peak RSS of its process tree in MB: getrusage(RUSAGE_CHILDREN).ru_maxrss is the largest of classify
    and its (reaped) worker processes. A parent of its own, so that earlier children of pytest do not count."""
    rss_file = out.with_name(out.name + ".rss")
    wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
               "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
               "sys.exit(rc)")
    cmd = [sys.executable, "-c", wrapper, str(rss_file), sys.executable, "-m", "fmnist_onnx", "classify",
           *map(str, paths), "-m", str(model), "-o", str(out), "--quiet", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc, int(rss_file.read_text()) / 1024  # ru_maxrss is in KiB on Linux


def one_row_each(out: Path, root: Path, files: list[str]) -> dict[str, dict]:
    rows = list(read_rows(out))
    got = [os.path.relpath(r["path"], root) for r in rows]
    assert sorted(got) == sorted(files), set(got) ^ set(files)  # every file, exactly once
    return {os.path.relpath(r["path"], root): r for r in rows}


def huge_png(width: int, height: int, row: bytes, band: tuple[int, int, bytes] | None = None) -> bytes:
    """A valid, tiny 8-bit grayscale PNG of width x height pixels: every row is ``row`` but those of ``band``
    (first, last, the row there), compressed a block of rows at a time: 64 Mpx fit in some 60 KB."""
    first, last, other = band or (height, height, row)
    z = zlib.compressobj(9)
    parts = []
    for line, count in ((b"\0" + row, first), (b"\0" + other, last - first), (b"\0" + row, height - last)):
        per = max(1, (1 << 20) // len(line))  # rows per block of about 1 MB
        block = line * per
        parts += [z.compress(block) for _ in range(count // per)]
        parts.append(z.compress(line * (count % per)))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def garments(test_pngs) -> list[tuple[Path, np.ndarray]]:
    """12 test PNGs, at least one of each class, and their pixels."""
    picked = [p for folder in sorted(test_pngs.iterdir()) for p in sorted(folder.glob("*.png"))[:1]]
    picked += sorted((test_pngs / "Trouser").glob("*.png"))[1:3]
    return [(p, np.asarray(Image.open(p))) for p in picked]


@pytest.fixture(scope="module")
def hostile_run(garments, onnx_model, tmp_path_factory) -> dict:
    """One classify run over a folder of good PNGs among files that claim huge sizes, damaged files and
    sideways photos: its rows by relative path, the process, its peak RSS."""
    root = tmp_path_factory.mktemp("hostile") / "in"
    files: dict[str, bytes] = {}
    for i, (path, _) in enumerate(garments):
        files[f"good/{i:02d}.png"] = path.read_bytes()
    # 64 Mpx each, 62-250 KB on disk; padded to a square, the first two would be 64,000,000^2 pixels (3.6 PiB)
    files["huge/1 x 64000000.png"] = huge_png(64_000_000, 1, b"\x80" * 64_000_000)
    files["huge/64000000 x 1.png"] = huge_png(1, 64_000_000, b"\x80")
    bar = b"\0" * 10_000 + b"\xff" * 44_000 + b"\0" * 10_000  # a light bar across a dark 1,000 x 64,000 image
    files["huge/64000 x 1000.png"] = huge_png(64_000, 1_000, b"\0" * 64_000, (400, 600, bar))
    files["huge/bomb 20000 x 20000.png"] = gray_png(20_000, 20_000, b"\0" * 20_001)
    for i, (_, img) in enumerate(garments):  # a photo as a camera held sideways stores it, and the same upright
        photo = 255 - np.asarray(Image.fromarray(img).resize((112, 112), Image.Resampling.LANCZOS))
        orientation, stored = [(6, np.rot90(photo, 1)), (8, np.rot90(photo, -1)), (3, photo[::-1, ::-1])][i % 3]
        files[f"exif/{i:02d} upright.jpg"] = jpeg_bytes(photo)
        files[f"exif/{i:02d} sideways.jpg"] = jpeg_bytes(np.ascontiguousarray(stored), orientation)
    files["damaged/strip.tif"] = damaged_tiff(garments[0][1])
    for name, data in hostile_pngs(garments[1][1]).items():
        files[f"png/{name}.png"] = data
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    out = root.parent / "rows.jsonl"
    proc, peak_mb = classify_measured([root], onnx_model, out, "--workers", "2")
    return {"proc": proc, "peak_mb": peak_mb, "rows": one_row_each(out, root, list(files)) if out.exists() else {},
            "files": list(files), "root": root, "out": out}


def test_a_hostile_folder_ends_normally_with_one_row_per_file_in_bounded_memory(hostile_run):
    proc = hostile_run["proc"]
    assert proc.returncode == 3, proc.stderr  # some files failed, the run finished
    assert "Traceback" not in proc.stderr, proc.stderr
    assert sorted(hostile_run["rows"]) == sorted(hostile_run["files"])
    assert hostile_run["peak_mb"] < PEAK_RSS_LIMIT_MB, hostile_run["peak_mb"]
    # nothing but the run's own lines on stderr: no libtiff warning naming no file
    leaked = [line for line in proc.stderr.splitlines()  # libtiff's own lines; not the summary's failed files
              if ("Decode" in line or "TIFF" in line) and ": cannot decode TIFF: " not in line]
    assert not leaked, proc.stderr


def test_files_that_claim_64_mpx_are_classified_and_bombs_refused(hostile_run):
    rows = hostile_run["rows"]
    for rel in ("huge/1 x 64000000.png", "huge/64000000 x 1.png", "huge/64000 x 1000.png"):
        assert rows[rel]["error"] is None and rows[rel]["label"], rows[rel]
    err = rows["huge/bomb 20000 x 20000.png"]["error"]
    assert err == "image too large: 400,000,000 pixels (limit 64,000,000 pixels: a possible decompression bomb)"


def test_a_photo_taken_sideways_is_classified_as_the_upright_one(hostile_run, garments):
    rows = hostile_run["rows"]
    for i in range(len(garments)):
        upright, sideways = rows[f"exif/{i:02d} upright.jpg"], rows[f"exif/{i:02d} sideways.jpg"]
        assert upright["error"] is None and sideways["label"] == upright["label"], (i, upright, sideways)


def test_damaged_files_get_errors_a_user_can_act_on(hostile_run):
    rows = hostile_run["rows"]
    assert rows["damaged/strip.tif"]["error"] == (
        "cannot decode TIFF: the image data is damaged or uses an unsupported compression (decoder error -2)")
    # what Pillow alone decides, libspng installed or not
    assert rows["png/bad IHDR CRC.png"]["error"] == "cannot decode PNG: its header is damaged"
    assert "Decompressed data too large" in rows["png/zTXt bomb.png"]["error"]
    assert rows["png/harmless chunks.png"]["error"] is None


# ---------------------------------------------------------------------------------------------- fuzzing

def _png_chunks(data: bytes) -> list[bytes]:
    """The chunks of a PNG (each with its length and CRC), signature excluded."""
    out, pos = [], 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos:pos + 12 + length])
        pos += 12 + length
    return out


def _with_ihdr(data: bytes, rng: random.Random) -> bytes:
    """A PNG whose IHDR says another size, depth, colour type or interlace, with a valid CRC (so that the
    decoders believe it)."""
    width, height, depth, color, comp, filt, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    field = rng.randrange(5)
    if field == 0:
        width, height = rng.choice([(0, 28), (28, 0), (100_000, 100_000), (2**31 - 1, 1), (6_000, 3_000),
                                    (28, rng.randrange(1, 5_000)), (rng.randrange(1, 5_000), 28),
                                    (10_000_000, 1), (1, 10_000_000), (5_000_000, 3)])
    elif field == 1:
        depth = rng.choice([1, 2, 4, 16, 3, 0, 255])
    elif field == 2:
        color = rng.choice([2, 3, 4, 6, 1, 7])
    elif field == 3:
        interlace = rng.choice([1, 2])
    else:
        comp, filt = rng.choice([(1, 0), (0, 1)])
    if field == 0 and width * height >= 5_000_000 and width * height <= images.MAX_PIXELS:
        # a long thin image that is valid: its image data matches the header, so that decoders make pixels of it
        return huge_png(width, height, bytes([rng.randrange(256)]) * width)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, comp, filt, interlace)
    return data[:8] + chunk(b"IHDR", ihdr) + data[33:]


def _with_sof(data: bytes, rng: random.Random) -> bytes:
    """A JPEG whose frame header (SOF0) says another size or component count."""
    at = data.find(b"\xff\xc0")
    if at < 0:
        return data
    b = bytearray(data)
    field = rng.randrange(3)
    if field == 0:
        struct.pack_into(">HH", b, at + 5, *rng.choice([(65_535, 65_535), (0, 28), (9_000, 9_000), (1, 60_000)]))
    elif field == 1:
        b[at + 9] = rng.choice([0, 2, 5, 255])  # components
    else:
        b[at + 4] = rng.choice([0, 12, 16])  # precision
    return bytes(b)


def mutate(data: bytes, kind: str, rng: random.Random) -> bytes:
    """One deterministic mutation of a valid file: truncated, bytes flipped, header fields changed, a chunk or
    a segment duplicated, a PNG chunk's CRC damaged."""
    how = rng.randrange(5)
    if how == 0:
        return data[:rng.randrange(1, len(data))]
    if how == 1 or (how == 4 and kind != "png"):
        b = bytearray(data)
        span = len(b) if how == 1 else min(len(b), 64)  # anywhere, or in the header
        for _ in range(rng.randrange(1, 9)):
            b[rng.randrange(span)] ^= 1 << rng.randrange(8)
        return bytes(b)
    if how == 2:
        return _with_ihdr(data, rng) if kind == "png" else _with_sof(data, rng) if kind == "jpg" else data[::-1]
    if kind == "png":
        chunks = _png_chunks(data)
        i = rng.randrange(len(chunks))
        if how == 3:
            chunks.insert(rng.randrange(len(chunks) + 1), chunks[i])
        else:
            chunks[i] = chunks[i][:-4] + bytes(x ^ 0x5A for x in chunks[i][-4:])
        return data[:8] + b"".join(chunks)
    i, j = sorted(rng.sample(range(2, len(data)), 2))
    return data[:j] + data[i:j] + data[j:]  # a stretch of segments (or of whatever is there) twice


def fuzzed_files(garments: list[tuple[Path, np.ndarray]], n: int = 300, seed: int = 9) -> dict[str, bytes]:
    """``n`` files mutated from valid PNGs (gray, RGB, palette, 16-bit), JPEGs (with EXIF) and TIFFs of real
    test images, with a fixed seed: the same files on every run."""
    sources = []
    for _, img in garments:
        for mode, kind in (("L", "png"), ("RGB", "png"), ("P", "png"), ("I;16", "png"), ("L", "jpg"),
                           ("RGB", "jpg"), ("L", "tif")):
            im = Image.fromarray(img.astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(img).convert(mode)
            buf = io.BytesIO()
            if kind == "jpg":
                exif = Image.Exif()
                exif[0x0112] = 6
                im.save(buf, format="JPEG", quality=90, exif=exif)
            else:
                im.save(buf, format={"png": "PNG", "tif": "TIFF"}[kind],
                        **({"compression": "tiff_lzw"} if kind == "tif" else {}))
            sources.append((kind, buf.getvalue()))
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        kind, data = sources[rng.randrange(len(sources))]
        out[f"{i:03d}.{kind}"] = mutate(data, kind, rng)
    return out


@pytest.fixture(scope="module")
def fuzzed(garments) -> dict[str, bytes]:
    return fuzzed_files(garments)


def test_fuzzed_files_get_one_row_each_and_the_run_ends_normally(fuzzed, garments, onnx_model, tmp_path):
    root = tmp_path / "fuzz"
    root.mkdir()
    for name, data in fuzzed.items():
        (root / name).write_bytes(data)
    for i, (path, _) in enumerate(garments[:4]):  # good files among them, classified as ever
        shutil.copy(path, root / f"good {i}.png")
    out = tmp_path / "fuzz.jsonl"
    proc, peak_mb = classify_measured([root], onnx_model, out, "--workers", "2", "--json")
    assert proc.returncode in (0, 3), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    rows = one_row_each(out, root, [*fuzzed, *(f"good {i}.png" for i in range(4))])
    assert peak_mb < PEAK_RSS_LIMIT_MB, peak_mb
    for row in rows.values():
        assert (row["label"] is None) != (row["error"] is None), row  # a label or an error, never both
    assert all(rows[f"good {i}.png"]["error"] is None for i in range(4))
    summary = json.loads(proc.stdout)
    assert summary["files"] == len(rows) and summary["failed"] == sum(r["error"] is not None for r in rows.values())
    # the mutations reach the decoders: many files decode, many do not
    assert 0.2 < summary["failed"] / len(rows) < 0.9, summary


def test_fuzzed_pngs_give_the_same_results_with_and_without_libspng(fuzzed, monkeypatch):
    pngs = [data for name, data in fuzzed.items() if name.endswith(".png")]
    assert len(pngs) > 100
    fast, fast_errors = images.preprocess_batch(pngs, "no")
    monkeypatch.setattr(images, "pyspng", None)
    slow, slow_errors = images.preprocess_batch(pngs, "no")
    assert fast_errors == slow_errors
    np.testing.assert_array_equal(fast, slow)


def _flip_in_idat(data: bytes, rng: random.Random) -> bytes:
    """``data`` with 1 to 3 bits flipped inside its IDAT chunks' data, the chunks' CRCs left as they were."""
    spans, pos = [], 8
    for c in _png_chunks(data):
        if c[4:8] == b"IDAT":
            spans.append((pos + 8, pos + len(c) - 4))
        pos += len(c)
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        start, stop = rng.choice(spans)
        b[rng.randrange(start, stop)] ^= 1 << rng.randrange(8)
    return bytes(b)


def test_pngs_damaged_inside_the_image_data_give_the_same_results_with_and_without_libspng(test_pngs, monkeypatch):
    # 400 of the exported test PNGs, every class, a bit or three flipped in the compressed pixels: libspng
    # ignores CRCs and stops inflating at the last row, so it made pixels of most of them where Pillow errs
    files = sorted(test_pngs.rglob("*.png"))[::25]
    good = [p.read_bytes() for p in files]
    assert len(good) == 400 and all(images._fast_png(data) is not None for data in good)  # the fast path's files
    rng = random.Random(27)
    damaged = [_flip_in_idat(data, rng) for data in good]
    fast, fast_errors = images.preprocess_batch(damaged, "auto")
    monkeypatch.setattr(images, "pyspng", None)
    slow, slow_errors = images.preprocess_batch(damaged, "auto")
    assert fast_errors == slow_errors
    np.testing.assert_array_equal(fast, slow)
    assert sum(map(bool, slow_errors)) > 300, slow_errors  # the damage reaches the decoders
