"""classify on the train PNGs kept as tar shards written by each tool users have, against the PNG folder.

    python benchmarks/classify_writers.py --model artifacts/model.onnx                # 60,000 images, 5 repeats
    python benchmarks/classify_writers.py --model m.onnx --limit 6000 --shard-size 1200 --repeats 1  # a quick check

The PNG folder (``data export-png``, the ImageFolder layout) is archived into shards of --shard-size images by
each writer: Python's tarfile in its default pax format (``tar.add``: an 'x' header before every member, for the
fractional mtime), WebDataset's TarWriter, GNU tar --format=gnu and --format=posix, and bsdtar (benchmarks/
archives.py ``write_with``); the same images as Parquet written by the `datasets` library (``Dataset.to_parquet``,
an ``image`` struct and a ``ClassLabel``), as one file and as a folder of shards named as the Hugging Face Hub
names them (``data/train-0000K-of-0000N.parquet``, the folder on the command line). Every contender is a fresh
``fmnist-onnx classify`` process of all its shards
(local engine, all cores), timed from start to exit on a warm page cache, interleaved (a burst of other work
hits every contender), --repeats times: medians and bests per contender, and each writer's median over the
folder's (above 1: faster than the folder). Each contender also runs on its first shard's images alone (the
first --shard-size names: a folder of those PNGs, the first shard, a Parquet file of them), so that each repeat
gives a steady state, (N - shard) / (t_N - t_shard) images/s, start-up cancelled out; the ratios of their
medians to the folder's are the steady-state figures. Labels and true classes must equal the folder's, image by image.
Writes benchmarks/results/classify_writers.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from archives import write_with
from classify_sources import REPO, RESULTS, classify, cli, warm

WRITERS = ("tarfile_pax", "webdataset", "gnutar_gnu", "gnutar_posix", "bsdtar")
PARQUET = ("datasets_file", "datasets_shards")


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


def parquet(folder: Path, kind: str, work: Path, size: int) -> list[Path]:
    """The PNGs of ``folder`` in name order written by `datasets`: one file (``datasets_file``) or a folder of
    Parquet shards of ``size`` rows (``datasets_shards``: the folder is what is named), written once per --work."""
    import datasets

    from fmnist_onnx.spec import CLASSES, class_folder_name

    out = work / kind
    if not out.exists():
        tmp = work / f"{kind}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "data").mkdir(parents=True)
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
        index = {class_folder_name(c): i for i, c in enumerate(CLASSES)}
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
        ds = datasets.Dataset.from_dict({"image": [{"bytes": (folder / n).read_bytes(), "path": None} for n in names],
                                         "label": [index[n.split("/")[0]] for n in names]}, features=features)
        if kind == "datasets_file":
            ds.to_parquet(tmp / "data" / "train.parquet")
        else:
            k = -(-len(names) // size)
            for i in range(k):
                ds.select(range(i * size, min(len(names), (i + 1) * size))).to_parquet(
                    tmp / "data" / f"train-{i:05d}-of-{k:05d}.parquet")
        tmp.rename(out)
    return [out / "data"] if kind == "datasets_shards" else [out / "data" / "train.parquet"]


def first_shard(folder: Path, name: str, paths: list[Path], work: Path, size: int) -> list[Path]:
    """The same contender on the first ``size`` images only: a folder of those PNGs (hard links), the first tar
    shard, or the first Parquet shard `datasets` wrote (in a folder of its own, or as the one file)."""
    if name.startswith("gnutar") or name in WRITERS:
        return paths[:1]
    out = work / f"{name}_first"
    if name == "folder" and not out.exists():
        tmp = work / "folder_first.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        for n in sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))[:size]:
            (tmp / n).parent.mkdir(parents=True, exist_ok=True)
            os.link(folder / n, tmp / n)
        tmp.rename(out)
    elif name == "datasets_shards" and not out.exists():
        (out / "data").mkdir(parents=True)
        first = sorted(paths[0].glob("*.parquet"))[0]
        os.link(first, out / "data" / first.name)
    elif name == "datasets_file" and not out.exists():  # its first rows as `datasets` writes them: one file
        (out / "data").mkdir(parents=True)
        shard = parquet(folder, "datasets_shards", work, size)[0]
        os.link(sorted(shard.glob("*.parquet"))[0], out / "data" / "train.parquet")
    return [out / "data"] if name == "datasets_shards" else (
        [out / "data" / "train.parquet"] if name == "datasets_file" else [out])


def rows_by_image(table: Path, names: list[str], size: int) -> dict[str, tuple]:
    """{image path inside the folder: (label, true label, error)}; a Parquet row N of shard K is the name at
    K * size + N (shards are written in name order), of a single file the name at N."""
    from fmnist_onnx.table import read_rows

    out = {}
    for r in read_rows(table):
        container, _, member = r["path"].partition("::")
        if member.startswith("row/"):
            shard = re.search(r"train-(\d+)-of-", container)
            name = names[int(member[4:]) + (int(shard.group(1)) * size if shard else 0)]
        else:
            name = member or "/".join(Path(r["path"]).parts[-2:])
        out[name] = (r["label"], r["true_label"], r["error"])
    return out


def summarize(runs: dict, first: dict, args, machine: dict) -> dict:
    """Medians, bests and ratios to the folder, whole process and steady state (each repeat's own, then median)."""
    median = {k: statistics.median(v) for k, v in runs.items()}
    steady = {k: [(args.limit - args.shard_size) / (t - s) for t, s in zip(runs[k], first[k], strict=True)]
              for k in runs}
    steady_median = {k: statistics.median(v) for k, v in steady.items()}
    others = [k for k in runs if k != "folder"]
    return {"machine": machine, "images": args.limit,
            "shard_size": args.shard_size, "repeats": args.repeats, "runs_s": runs, "first_shard_runs_s": first,
            "median_s": {k: round(v, 3) for k, v in median.items()},
            "best_s": {k: round(min(v), 3) for k, v in runs.items()},
            "steady_images_per_s_median": {k: round(v) for k, v in steady_median.items()},
            "speed_over_folder_median": {w: round(median["folder"] / median[w], 3) for w in others},
            "steady_over_folder_median": {w: round(steady_median[w] / steady_median["folder"], 3) for w in others}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=60_000, help="the first N train images [60000]")
    ap.add_argument("--shard-size", type=int, default=12_000, help="images a shard [12000]")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--writers", nargs="+", default=[*WRITERS, *PARQUET], choices=[*WRITERS, *PARQUET])
    ap.add_argument("--work", type=Path, help="where the layouts are written, kept (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=RESULTS / "classify_writers.json")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from fmnist_onnx.machine import machine_info

    machine = machine_info()  # its load average: the machine before this benchmark adds its own

    work = args.work or Path(tempfile.mkdtemp(prefix="fmnist-writers-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / f"png_{args.limit}"
    if not folder.exists():
        cli("data", "export-png", "--split", "train", "--limit", args.limit, "--format", "png", "--out", folder,
            "--quiet")
    inputs = {"folder": [folder], **{w: shards(folder, w, work, args.shard_size) for w in args.writers
                                      if w in WRITERS},
              **{w: parquet(folder, w, work, args.shard_size) for w in args.writers if w in PARQUET}}
    small = {name: first_shard(folder, name, paths, work, args.shard_size) for name, paths in inputs.items()}
    for paths in [*inputs.values(), *small.values()]:
        warm(paths)
    runs: dict[str, list[float]] = {name: [] for name in inputs}
    first: dict[str, list[float]] = {name: [] for name in inputs}
    for _ in range(args.repeats):
        for name, paths in inputs.items():
            runs[name].append(classify(paths, args.model, work / f"{name}.csv"))
            first[name].append(classify(small[name], args.model, work / f"{name}_first.csv"))
    result = summarize(runs, first, args, machine)
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    want = rows_by_image(work / "folder.csv", names, args.shard_size)
    result["identical_rows"] = {w: rows_by_image(work / f"{w}.csv", names, args.shard_size) == want
                                for w in args.writers}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "speed_over_folder_median", "steady_over_folder_median",
                                             "identical_rows")}, indent=1))
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
