"""Does a `bench` row's figure depend on how long it is measured? One long run per row, cut into slices.

    python benchmarks/bench_drift.py                                   # artifacts/model.onnx, its int8 twin, model.pth
    python benchmarks/bench_drift.py --model m.onnx --seconds 6 --slice 0.5

For each option `bench` measures (onnxruntime fp32 and int8 on the CPU, PyTorch eager where model.pth is found)
and each default batch size: warm up, then call it for --seconds, timing every call; print images/s per --slice
of the run, and the images/s of the first 1.25 s (a default `bench` row: 1 s after its warm-up) against the first
2.5 s (a `--full` row), from the mean time of a call (as `bench` reports) and from the median. If the figure
drifts with the run's length, the two columns differ the same way on every row; if the machine's speed swings
from slice to slice, they differ both ways. Prints only; nothing is written.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np

from fmnist_onnx import bench


def slices(make, batch: np.ndarray, seconds: float) -> np.ndarray:
    """(start, duration) of every call of one runner over ``seconds``, after 20 calls of warm-up."""
    runner = make(batch)
    calls = []
    try:
        with runner.context():
            for _ in range(20):
                runner.run()
            gc.disable()
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                t0 = time.perf_counter()
                runner.run()
                calls.append((t0 - start, time.perf_counter() - t0))
    finally:
        gc.enable()
        runner.close()
    return np.asarray(calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("artifacts/model.onnx"))
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--slice", type=float, default=0.5)
    args = ap.parse_args()
    options = {"onnxruntime fp32": bench._ort_candidate(args.model, "cpu", "fp32", None)}
    if bench.int8_beside(args.model).is_file():
        options["onnxruntime int8"] = bench._ort_candidate(bench.int8_beside(args.model), "cpu", "int8", None)
    if args.model.with_suffix(".pth").is_file() and bench.torch_missing() is None:
        options["torch fp32"] = bench._torch_candidate(args.model.with_suffix(".pth"), "cpu", None)
    x = bench.make_input(max(bench.DEFAULT_BATCH_SIZES))
    for name, cand in options.items():
        for bs in bench.DEFAULT_BATCH_SIZES:
            calls = slices(cand.make, x[:bs], args.seconds)
            gc.collect()
            per_slice = [bs / calls[(calls[:, 0] >= lo) & (calls[:, 0] < lo + args.slice), 1].mean()
                         for lo in np.arange(0, args.seconds - 1e-9, args.slice)]
            short, long = calls[calls[:, 0] < 1.25, 1], calls[calls[:, 0] < 2.5, 1]
            print(f"{name} batch {bs}: images/s per {args.slice} s " + " ".join(f"{v / 1e3:.0f}k" for v in per_slice)
                  + f" | mean: 1.25 s {bs / short.mean() / 1e3:.1f}k, 2.5 s {bs / long.mean() / 1e3:.1f}k"
                  + f" | median: 1.25 s {bs / np.median(short) / 1e3:.1f}k, 2.5 s {bs / np.median(long) / 1e3:.1f}k",
                  flush=True)


if __name__ == "__main__":
    main()
