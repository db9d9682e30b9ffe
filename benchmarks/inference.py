"""Inference backends side by side on this machine: the figures docs/benchmarks.md shows.

    python benchmarks/inference.py                  # about 1 min: 5 batch sizes x 3 options x 2 s
    python benchmarks/inference.py --duration 0.5 --batch-sizes 1,256,1024

Uses artifacts/model.onnx and artifacts/model.pth (--model/--weights to change); where they are missing it
trains the fast recipe (seed 0) and exports it, in a temporary folder. Runs the same measurement as
`fmnist-onnx bench` (fmnist_onnx.bench.run_benchmark), adds the test accuracy of fp32 and int8 on the
10,000 test images, checks the targets, and writes benchmarks/results/inference.json (the
`bench --json` form plus "accuracy" and "targets") and inference.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from fmnist_onnx.bench import format_table, int8_beside, parse_batch_sizes, run_benchmark, save_json
from fmnist_onnx.runtime import open_session

RESULTS = Path(__file__).resolve().parent / "results"
ARTIFACTS = Path("artifacts")


def prepare(model: Path | None, weights: Path | None, work: Path) -> tuple[Path, Path]:
    """(model.onnx, model.pth) to measure, with an int8 model beside the ONNX one."""
    weights = weights or ARTIFACTS / "model.pth"
    if not weights.is_file():
        from fmnist_onnx.train import make_config, train

        print(f"{weights} not found: training the fast recipe (seed 0) in {work}", file=sys.stderr, flush=True)
        weights = train(make_config("fast", seed=0), work / "trained").out_dir / "model.pth"
    model = model or ARTIFACTS / "model.onnx"
    if not model.is_file():
        from fmnist_onnx.export import export_onnx

        print(f"{model} not found: exporting {weights}", file=sys.stderr, flush=True)
        model = export_onnx(weights, work / "model.onnx")
    if not int8_beside(model).is_file():
        from fmnist_onnx.export import quantize_int8

        # Quantize once, beside a copy, so that the accuracy below and the benchmark use the same int8 file.
        copy = work / "model.onnx"
        if model.resolve() != copy.resolve():
            shutil.copyfile(model, copy)
        model = copy
        quantize_int8(model, int8_beside(model))
    return model, weights


def accuracy(model: Path) -> float:
    """Top-1 accuracy (%) on the 10,000 Fashion-MNIST test images, with onnxruntime on the CPU."""
    from fmnist_onnx.data import load_split

    test = load_split(False)
    x, y = test.as_float().numpy(), test.labels.numpy()
    sess = open_session(model, "cpu")
    pred = np.concatenate([sess.run(x[i:i + 1000]).argmax(1) for i in range(0, len(y), 1000)])
    return float((pred == y).mean() * 100)


def check_targets(results: list[dict], acc: dict) -> list[dict]:
    """The README's targets, each met or missed (skipped where its batch size was not measured).

    ``value`` uses images/s (batch / mean latency), as the table does. On a busy machine the mean carries the
    stalls that other processes cause, so each speed target also gets ``median_value``: the same ratio from
    the median latencies, which a few stalls do not move."""
    def rec(backend: str, precision: str, bs: int) -> dict | None:
        return next((r for r in results if (r["backend"], r["precision"], r["batch_size"], r["provider"],
                     r["io_binding"]) == (backend, precision, bs, "cpu", False)), None)

    out = []

    def target(name: str, value: float | None, threshold: float, higher: bool = True, median: float | None = None):
        if value is not None:
            out.append({"target": name, "value": value, "threshold": threshold,
                        "met": value >= threshold if higher else value <= threshold})
            if median is not None:
                out[-1]["median_value"] = median

    def ratio(a: dict | None, b: dict | None) -> tuple[float | None, float | None]:
        if not a or not b:
            return None, None
        return a["images_per_s"] / b["images_per_s"], b["latency_ms"]["p50"] / a["latency_ms"]["p50"]

    for bs in (1, 256):
        value, median = ratio(rec("onnxruntime", "fp32", bs), rec("torch", "fp32", bs))
        target(f"onnxruntime fp32 / torch eager, batch {bs}", value, 1.3, median=median)
    value, median = ratio(rec("onnxruntime", "int8", 256), rec("onnxruntime", "fp32", 256))
    target("int8 / fp32, batch 256", value, 2.0, median=median)
    target("accuracy lost by int8 (points)", acc["fp32"] - acc["int8"], 0.5, higher=False)
    r = rec("onnxruntime", "fp32", 1024)
    if r:
        # The peak is the best call of a matrix product; the median call of the model is the fairer match.
        target("onnxruntime fp32 batch 1024, % of roofline", r["roofline_pct"], 80.0,
               median=r["roofline_pct"] * r["latency_ms"]["mean"] / r["latency_ms"]["p50"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--weights", type=Path)
    p.add_argument("--batch-sizes", default="1,8,64,256,1024")
    p.add_argument("--provider", action="append", help="auto (default), cpu or cuda; repeatable")
    p.add_argument("--threads", type=int)
    p.add_argument("--duration", type=float, default=2.0, help="seconds per measurement (default 2)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fmnist-inference-bench-") as tmp:
        model, weights = prepare(args.model, args.weights, Path(tmp))
        acc = {"fp32": accuracy(model), "int8": accuracy(int8_beside(model))}
        report = run_benchmark(model, weights, parse_batch_sizes(args.batch_sizes), args.provider or ["auto"],
                               args.threads, args.duration)
    data = report.to_json()
    data["accuracy"] = {"test_accuracy_pct": acc, "images": 10000}
    data["targets"] = check_targets(data["results"], acc)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_json(data, args.out_dir / "inference.json", overwrite=True)
    from fmnist_onnx.plots import bench_chart

    bench_chart(data, args.out_dir / "inference.png", title=f"inference on {report.machine['cpu']}, "
                f"{report.machine['usable_cores']} cores")

    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(format_table(report))
    print(f"test accuracy: fp32 {acc['fp32']:.2f}%, int8 {acc['int8']:.2f}%")
    for t in data["targets"]:
        median = f"; from median latencies {t['median_value']:.2f}" if "median_value" in t else ""
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.2f} "
              f"({'>=' if 'lost' not in t['target'] else '<='} {t['threshold']}{median})")
    print(f"wrote {args.out_dir / 'inference.json'} and inference.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
