"""classify on the train PNGs kept as tar shards written by each tool users have, against the PNG folder.

    python benchmarks/classify_writers.py --model artifacts/model.onnx                # 60,000 images, 5 repeats
    python benchmarks/classify_writers.py --model m.onnx --limit 6000 --repeats 1    # a quick check that it works

The PNG folder (``data export-png``, the ImageFolder layout) is archived into shards of --shard-size images by
each writer: Python's tarfile in its default pax format (``tar.add``: an 'x' header before every member, for the
fractional mtime), WebDataset's TarWriter, GNU tar --format=gnu and --format=posix, and bsdtar (benchmarks/
archives.py ``write_with``). Every contender is a fresh ``fmnist-onnx classify`` process of all its shards
(local engine, all cores), timed from start to exit on a warm page cache, interleaved (a burst of other work
hits every contender), --repeats times: medians and bests per contender, and each writer's median over the
folder's (above 1: faster than the folder). Labels and true classes must equal the folder's, image by image.
Writes benchmarks/results/classify_writers.json (--out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from archives import write_with
from classify_sources import REPO, RESULTS, classify, cli, warm

WRITERS = ("tarfile_pax", "webdataset", "gnutar_gnu", "gnutar_posix", "bsdtar")


def shards(folder: Path, writer: str, work: Path, size: int) -> list[Path]:
    """The PNGs of ``folder`` in name order as ``writer``'s shards of ``size`` images (written once per --work)."""
    out = work / writer
    if not out.exists():
        tmp = work / f"{writer}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
        for i in range(0, len(names), size):
            write_with(writer, tmp / f"train-{i // size:06d}.tar", folder, names[i:i + size])
        tmp.rename(out)
    return sorted(out.glob("*.tar"))


def rows_by_image(table: Path) -> dict[str, tuple]:
    """{image path inside the folder or shard: (label, true label, error)}."""
    from fmnist_onnx.sinks import read_rows

    out = {}
    for r in read_rows(table):
        name = r["path"].partition("::")[2] if "::" in r["path"] else "/".join(Path(r["path"]).parts[-2:])
        out[name] = (r["label"], r["true_label"], r["error"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=60_000, help="the first N train images [60000]")
    ap.add_argument("--shard-size", type=int, default=12_000, help="images a shard [12000]")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--writers", nargs="+", default=list(WRITERS), choices=WRITERS)
    ap.add_argument("--work", type=Path, help="where the layouts are written, kept (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=RESULTS / "classify_writers.json")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from fmnist_onnx.machine import machine_info

    work = args.work or Path(tempfile.mkdtemp(prefix="fmnist-writers-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / f"png_{args.limit}"
    if not folder.exists():
        cli("data", "export-png", "--split", "train", "--limit", args.limit, "--format", "png", "--out", folder,
            "--quiet")
    inputs = {"folder": [folder], **{w: shards(folder, w, work, args.shard_size) for w in args.writers}}
    for paths in inputs.values():
        warm(paths)
    runs: dict[str, list[float]] = {name: [] for name in inputs}
    for _ in range(args.repeats):
        for name, paths in inputs.items():
            runs[name].append(classify(paths, args.model, work / f"{name}.csv"))
    median = {k: statistics.median(v) for k, v in runs.items()}
    want = rows_by_image(work / "folder.csv")
    result = {"machine": machine_info(), "images": args.limit, "shard_size": args.shard_size,
              "repeats": args.repeats, "runs_s": runs, "median_s": {k: round(v, 3) for k, v in median.items()},
              "best_s": {k: round(min(v), 3) for k, v in runs.items()},
              "speed_over_folder_median": {w: round(median["folder"] / median[w], 3) for w in args.writers},
              "identical_rows": {w: rows_by_image(work / f"{w}.csv") == want for w in args.writers}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "speed_over_folder_median", "identical_rows")}, indent=1))
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
