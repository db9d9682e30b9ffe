"""`fmnist-onnx classify` against the loop a user would write, on the same folder of PNG files, in one run.

    python benchmarks/classify_vs_naive.py                 # 60,000 train PNGs, about a minute
    python benchmarks/classify_vs_naive.py --folder my_pngs --repeats 3

The naive loop: one process, Pillow (``Image.open(p).convert("L")``), batches of 256, onnxruntime, a CSV of
(path, label). Both run as fresh processes (`python -c ...` and `fmnist-onnx classify`) and are timed from
start to exit, on a warm page cache (every file is read once before). They alternate, and the best of
``--repeats`` runs counts for each. Writes benchmarks/results/classify.json: images/s of both, the ratio
(the target is 4x, the aim 6x) and the machine. Uses artifacts/model.onnx; where it is missing it trains
the fast recipe and exports it, in a temporary folder. Without --folder, the train split is exported to
PNG files in a temporary folder (`fmnist-onnx data export-png --split train`).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGET, AIM = 4.0, 6.0

NAIVE = r"""
import csv, sys
from pathlib import Path
import numpy as np, onnxruntime as ort
from PIL import Image

folder, model, out = sys.argv[1:4]
classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
paths = sorted(str(p) for p in Path(folder).rglob("*.png"))
with open(out, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "label"])
    for i in range(0, len(paths), 256):
        batch = paths[i:i + 256]
        x = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0 for p in batch])
        logits = sess.run(None, {name: x[:, None]})[0]
        w.writerows((p, classes[k]) for p, k in zip(batch, logits.argmax(1)))
"""


def run_timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its children: user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def prepare_model(model: Path | None, work: Path) -> Path:
    model = model or Path("artifacts/model.onnx")
    if model.is_file():
        return model
    from fmnist_onnx.export import export_onnx
    from fmnist_onnx.train import make_config, train

    print(f"{model} not found: training the fast recipe (seed 0) and exporting it in {work}", file=sys.stderr)
    weights = train(make_config("fast", seed=0), work / "trained").out_dir / "model.pth"
    return export_onnx(weights, work / "model.onnx")


def png_folder(folder: Path | None, split: str, work: Path) -> Path:
    """``folder``, or the ``split`` exported as PNG files into ``work`` by `fmnist-onnx data export-png`."""
    if folder is not None:
        return folder
    folder = work / f"{split}_png"
    print(f"exporting the {split} split to {folder}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "fmnist_onnx", "data", "export-png", "--split", split,
                    "--out", str(folder), "--quiet"], check=True)
    return folder


def count_and_warm(folder: Path) -> int:
    """Read every PNG once, so that both contenders find them in the page cache."""
    n = 0
    for p in folder.rglob("*.png"):
        p.read_bytes()
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, help="PNG folder [the train split, exported to a temporary folder]")
    ap.add_argument("--model", type=Path, help="ONNX model [artifacts/model.onnx, or trained and exported here]")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts [2]")
    ap.add_argument("--workers", type=int, help="classify --workers [number of cores]")
    ap.add_argument("--out", type=Path, default=RESULTS / "classify.json")
    args = ap.parse_args()

    from fmnist_onnx.bench import machine_info, save_json

    with tempfile.TemporaryDirectory(prefix="fmnist-classify-bench-") as tmp:
        work = Path(tmp)
        model = prepare_model(args.model, work)
        folder = png_folder(args.folder, "train", work)
        n = count_and_warm(folder)
        naive_cmd = [sys.executable, "-c", NAIVE, str(folder), str(model), str(work / "naive.csv")]
        classify_cmd = [sys.executable, "-m", "fmnist_onnx", "classify", str(folder), "-m", str(model),
                        "-o", str(work / "classify.csv"), "--overwrite", "--quiet", "--json"]
        if args.workers:
            classify_cmd += ["--workers", str(args.workers)]
        naive_s, classify_s, naive_cpu, classify_cpu = [], [], [], []
        for r in range(args.repeats):
            for cmd, wall, cpu in ((naive_cmd, naive_s, naive_cpu), (classify_cmd, classify_s, classify_cpu)):
                w, c = run_timed(cmd)
                wall.append(w)
                cpu.append(c)
            print(f"run {r + 1}: naive {n / naive_s[-1]:,.0f} images/s, classify {n / classify_s[-1]:,.0f} "
                  f"images/s", file=sys.stderr, flush=True)
        rows = sum(1 for _ in open(work / "classify.csv")) - 1
        if rows != n:
            raise SystemExit(f"classify wrote {rows} rows for {n} files")

    best_naive, best_classify = min(naive_s), min(classify_s)
    ratio = best_naive / best_classify
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # On a busy machine wall-clock ratios mean little; CPU time does not depend on the neighbours. This is the
    # ratio an idle machine would give if classify's CPU time spread perfectly over the cores.
    cpu_ratio = min(naive_cpu) / (min(classify_cpu) / cores)
    result = {
        "images": n,
        "folder": str(args.folder) if args.folder else "train split exported by `fmnist-onnx data export-png`",
        "naive": {"seconds": round(best_naive, 3), "images_per_s": round(n / best_naive, 1),
                  "runs_s": [round(s, 3) for s in naive_s], "cpu_us_per_image": round(1e6 * min(naive_cpu) / n, 1),
                  "what": "one process, Pillow, batches of 256, onnxruntime CPU, CSV of path,label"},
        "classify": {"seconds": round(best_classify, 3), "images_per_s": round(n / best_classify, 1),
                     "runs_s": [round(s, 3) for s in classify_s],
                     "cpu_us_per_image": round(1e6 * min(classify_cpu) / n, 1), "command": " ".join(classify_cmd[1:])},
        "ratio": round(ratio, 2),
        "ratio_from_cpu_time": round(cpu_ratio, 2),
        "load_average": os.getloadavg(),
        "target_ratio": TARGET,
        "aim_ratio": AIM,
        "meets_target": ratio >= TARGET,
        "timing": "wall clock of each whole process, start to exit, warm page cache; best of the repeats",
        "machine": machine_info(),
    }
    save_json(result, args.out, overwrite=True)
    print(f"{n} PNG files: naive {n / best_naive:,.0f} images/s, classify {n / best_classify:,.0f} images/s: "
          f"{ratio:.2f}x (target {TARGET:.0f}x, aim {AIM:.0f}x); from CPU time over {cores} cores: {cpu_ratio:.2f}x "
          f"(load average {os.getloadavg()[0]:.1f}). Wrote {args.out}")


if __name__ == "__main__":
    main()
