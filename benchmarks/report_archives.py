"""`fmnist-onnx report` over images inside archives: the same 2,000 labelled rows read from a .tar, the same
tar compressed (.tar.gz, .tar.bz2), and three zips with the rows alternating between them.

    python benchmarks/report_archives.py             # 2,000 test PNGs, 5 rounds: about a minute
    python benchmarks/report_archives.py --rows 500 --repeats 3

The archives (ImageFolder layout inside: ``Bag/00012.png``) and a table per layout (path, label, index, score,
error, true_label; about 85% right, as a classify run would write it) are written to a temporary folder once.
Each round runs `report` as a whole process once per layout, in turn (interleaved: a slow spell of the
machine hits every layout alike); the figure is the median of the rounds. Before the report read each archive
once, a compressed tar was streamed from its start for every figure drawn (16 s from the .tar.gz against
0.9 s from the .tar). Prints a JSON object; writes nothing else.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from fmnist_onnx.data import DEBIAN_DIR
from fmnist_onnx.spec import CLASSES


def test_split(count: int) -> list[tuple[str, bytes, int]]:
    """The first ``count`` test images as (member name in the ImageFolder layout, PNG bytes, class)."""
    raw = gzip.open(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").read()
    labels = gzip.open(DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").read()
    pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    out = []
    for i, (img, label) in enumerate(zip(pixels, labels[8:8 + count], strict=True)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append((f"{CLASSES[label].replace('/', '-')}/{i:05d}.png", buf.getvalue(), int(label)))
    return out


def write_layouts(folder: Path, images: list[tuple[str, bytes, int]]) -> dict[str, list[str]]:
    """The archives, and each layout's row paths in the images' order: {layout: [path, ...]}."""
    for suffix, mode in ((".tar", "w"), (".tar.gz", "w:gz"), (".tar.bz2", "w:bz2")):
        with tarfile.open(folder / f"images{suffix}", mode) as tf:
            for name, data, _ in images:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    zips = [folder / f"part{k}.zip" for k in range(3)]
    for k, path in enumerate(zips):
        with zipfile.ZipFile(path, "w") as zf:
            for name, data, _ in images[k::3]:
                zf.writestr(name, data)
    layouts = {s: [f"{folder}/images{s}::{name}" for name, _, _ in images] for s in (".tar", ".tar.gz", ".tar.bz2")}
    layouts["3 zips"] = [f"{zips[i % 3]}::{name}" for i, (name, _, _) in enumerate(images)]
    return layouts


def write_table(path: Path, rows: list[str], images: list[tuple[str, bytes, int]]) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label", "index", "score", "error", "true_label"])
        for row, (_, _, truth) in zip(rows, images, strict=True):
            pred = truth if rng.random() < 0.85 else int(rng.integers(0, len(CLASSES)))
            w.writerow([row, CLASSES[pred], pred, f"{rng.uniform(0.3, 1):.4f}", "", CLASSES[truth]])


def report_seconds(table: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fmnist_onnx", "report", str(table), "-o", str(table.with_suffix(".html")),
                    "--overwrite"], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    images = test_split(args.rows)
    with tempfile.TemporaryDirectory(prefix="fmnist-report-") as tmp:
        folder = Path(tmp)
        tables = {}
        for k, (layout, rows) in enumerate(write_layouts(folder, images).items()):
            tables[layout] = folder / f"t{k}.csv"
            write_table(tables[layout], rows, images)
        times: dict[str, list[float]] = {layout: [] for layout in tables}
        for _ in range(args.repeats):
            for layout, table in tables.items():
                times[layout].append(report_seconds(table))
    medians = {layout: round(statistics.median(t), 3) for layout, t in times.items()}
    print(json.dumps({"rows": args.rows, "repeats": args.repeats, "median_s": medians,
                      "tar_gz_over_tar": round(medians[".tar.gz"] / medians[".tar"], 2),
                      "times_s": {k: [round(x, 3) for x in v] for k, v in times.items()}}, indent=1))


if __name__ == "__main__":
    main()
