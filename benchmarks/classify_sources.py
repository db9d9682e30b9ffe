"""classify on the same images kept four ways: loose PNG files, WebDataset tar shards, a Parquet file (the
Hugging Face layout), and tar shards unpacked first (what a user had to do before the tar source existed).

    python benchmarks/classify_sources.py --model artifacts/model.onnx            # train split, best of 3

Every contender is a fresh `fmnist-onnx classify` process (local engine, all cores), timed from start to exit on
a warm page cache, alternating, best of --repeats, on two sizes of the same layout: the first 12,000 train
images and all 60,000. The steady state is (60,000 - 12,000) / (t60000 - t12000): start-up cancels out. The
unpacked contender times `tar -xf` of the shards into a fresh folder plus classify of that folder. Labels must be
identical across layouts (checked, image by image). Each repeat's own steady state is kept too, with their
median: a second estimate beside the best times'. Writes benchmarks/results/classify_sources.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SIZES = (12_000, 60_000)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmnist_onnx", *map(str, args)], capture_output=True, text=True,
                          check=True)


def export(work: Path, fmt: str, limit: int) -> list[Path]:
    """The first ``limit`` train images in layout ``fmt``: the paths to name on the command line."""
    out = work / f"{fmt}_{limit}"
    extra = ["--shard-size", "12000"] if fmt == "tar" else []
    if not out.exists():  # a --work folder of an earlier run is used again
        cli("data", "export-png", "--split", "train", "--limit", limit, "--format", fmt, "--out", out, "--quiet",
            *extra)
    if fmt == "png":
        return [out]
    return sorted(out.glob(f"*.{fmt}"))


def warm(paths: list[Path]) -> None:
    for p in paths:
        for f in ([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                f.read_bytes()


def classify(inputs: list[Path], model: Path, out: Path) -> float:
    t0 = time.perf_counter()
    cli("classify", *inputs, "-m", model, "-o", out, "--overwrite", "--quiet")
    return time.perf_counter() - t0


def unpack_and_classify(shards: list[Path], model: Path, work: Path) -> float:
    folder = work / "unpacked"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    folder.mkdir()
    for shard in shards:
        subprocess.run(["tar", "-xf", shard, "-C", folder], check=True)
    cli("classify", folder, "-m", model, "-o", work / "unpacked.csv", "--overwrite", "--quiet")
    return time.perf_counter() - t0


def labels_by_index(table: Path) -> dict[int, str]:
    """{image index: predicted label}: the index is the file's or member's number, or the Parquet row."""
    from fmnist_onnx.table import read_rows

    out = {}
    for r in read_rows(table):
        tail = re.split("[/:]", r["path"])[-1]  # 00012.png of a folder or a tar; 12 of a Parquet row/12
        out[int(tail.split(".")[0])] = r["label"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--unpack-repeats", type=int, default=1,
                    help="runs of the unpacking contender (it writes 60,000 files each time: up to a minute) [1]")
    ap.add_argument("--work", type=Path, help="where the layouts are written (default: a temporary folder)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from fmnist_onnx.machine import machine_info

    work = args.work or Path(tempfile.mkdtemp(prefix="fmnist-sources-"))
    inputs = {(fmt, n): export(work, fmt, n) for fmt in ("png", "tar", "parquet") for n in SIZES}
    for paths in inputs.values():
        warm(paths)
    runs: dict[str, list[float]] = {}
    for i in range(args.repeats):  # alternating: a burst of other work on the machine hits every contender
        for (fmt, n), paths in inputs.items():
            runs.setdefault(f"{fmt}_{n}", []).append(classify(paths, args.model, work / f"{fmt}_{n}.csv"))
        if i < args.unpack_repeats:
            runs.setdefault("unpack_tar_then_png_60000", []).append(
                unpack_and_classify(inputs["tar", 60_000], args.model, work))
    best = {k: min(v) for k, v in runs.items()}
    result = {"machine": machine_info(), "images": SIZES[-1], "repeats": args.repeats,
              "unpack_repeats": min(args.unpack_repeats, args.repeats), "runs_s": runs,
              "best_s": best, "whole_images_per_s": {}, "steady_images_per_s": {}}
    for fmt in ("png", "tar", "parquet"):
        result["whole_images_per_s"][fmt] = round(SIZES[-1] / best[f"{fmt}_{SIZES[-1]}"])
        result["steady_images_per_s"][fmt] = round((SIZES[-1] - SIZES[0]) /
                                                   (best[f"{fmt}_{SIZES[-1]}"] - best[f"{fmt}_{SIZES[0]}"]))
    # each repeat's own steady state, and their median: a second estimate, less at the mercy of one lucky run
    per_repeat = {fmt: [(SIZES[-1] - SIZES[0]) / (b - a) for a, b in
                        zip(runs[f"{fmt}_{SIZES[0]}"], runs[f"{fmt}_{SIZES[-1]}"], strict=True)]
                  for fmt in ("png", "tar", "parquet")}
    result["steady_images_per_s_median_of_repeats"] = {f: round(statistics.median(v)) for f, v in per_repeat.items()}
    steady, whole = result["steady_images_per_s"], result["whole_images_per_s"]
    median = result["steady_images_per_s_median_of_repeats"]
    result["ratios"] = {
        "tar_over_unpack_then_folder": round(best["unpack_tar_then_png_60000"] / best["tar_60000"], 2),
        "tar_over_folder_steady": round(steady["tar"] / steady["png"], 2),
        "parquet_over_folder_steady": round(steady["parquet"] / steady["png"], 2),
        "tar_over_folder_whole": round(whole["tar"] / whole["png"], 2),
        "parquet_over_folder_whole": round(whole["parquet"] / whole["png"], 2),
        "tar_over_folder_steady_median": round(median["tar"] / median["png"], 2),
        "parquet_over_folder_steady_median": round(median["parquet"] / median["png"], 2)}
    same = {fmt: labels_by_index(work / f"{fmt}_{SIZES[-1]}.csv") for fmt in ("png", "tar", "parquet")}
    result["identical_labels"] = same["png"] == same["tar"] == same["parquet"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "classify_sources.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("best_s", "whole_images_per_s", "steady_images_per_s", "ratios",
                                             "identical_labels")}, indent=1))
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
