"""int8 dynamic vs static (QDQ) quantization: accuracy and speed, the measurement behind export's default.

    python benchmarks/int8_methods.py                    # about 1 min
    python benchmarks/int8_methods.py --rounds 3 --batch-sizes 1,256

Uses artifacts/model.pth (--weights); where it is missing it trains the fast recipe (seed 0) in a temporary
folder. Exports it, quantizes it both ways, measures test accuracy and top-1 agreement with PyTorch
(fmnist_onnx.verify), then images/s on the CPU at each batch size: the methods interleaved, the best of
--rounds rounds (the least disturbed by other work on the machine). Writes benchmarks/results/int8_methods.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def images_per_s(session, x, seconds: float) -> float:
    session.run(None, {"input": x})  # warm-up, not timed
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        session.run(None, {"input": x})
        n += 1
    return n * len(x) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=Path("artifacts/model.pth"))
    ap.add_argument("--batch-sizes", default="1,256,1024")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5, help="timed seconds per method, batch size and round")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=RESULTS / "int8_methods.json")
    args = ap.parse_args()

    import onnxruntime as ort

    from fmnist_onnx.export import export_onnx, quantize_int8
    from fmnist_onnx.verify import verify

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = args.weights
        if not weights.is_file():
            from fmnist_onnx.train import make_config, train

            print(f"{weights} not found: training the fast recipe (seed 0)", file=sys.stderr, flush=True)
            weights = train(make_config("fast", seed=0), work / "trained").out_dir / "model.pth"
        models = {"fp32": export_onnx(weights, work / "model.onnx")}
        for method in ("dynamic", "static"):
            t0 = time.perf_counter()
            models[method] = quantize_int8(models["fp32"], work / f"model.{method}.onnx", method=method)
            print(f"{method}: quantized in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

        rows = {}
        for name, path in models.items():
            r = verify(path, weights, ("cpu",)).results[0]
            rows[name] = {"test_accuracy_pct": r.onnx_accuracy_pct, "accuracy_change_points": r.accuracy_change_points,
                          "top1_agreement_pct": r.top1_agreement_pct, "file_size_bytes": path.stat().st_size,
                          "images_per_s": {}}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sessions = {name: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                    for name, path in models.items()}
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        x = np.random.default_rng(0).random((max(sizes), 1, 28, 28), dtype=np.float32)
        for _ in range(args.rounds):
            for b in sizes:
                for name, sess in sessions.items():
                    ips = images_per_s(sess, x[:b], args.seconds)
                    best = rows[name]["images_per_s"]
                    best[str(b)] = max(best.get(str(b), 0.0), ips)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpu_flags = ""
    try:
        cpu_flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
                    "load_average_1min": load, "avx512_vnni": "avx512_vnni" in cpu_flags,
                    "avx_vnni": " avx_vnni" in cpu_flags, "amx_int8": "amx_int8" in cpu_flags,
                    "onnxruntime": ort.__version__},
        "rounds": args.rounds, "seconds_per_measurement": args.seconds, "methods": rows,
    }
    print(f"{'':8} {'accuracy':>9} {'change':>7} {'agree':>7} " + " ".join(f"{'b' + str(b):>10}" for b in sizes))
    for name, row in rows.items():
        print(f"{name:8} {row['test_accuracy_pct']:8.2f}% {row['accuracy_change_points']:+7.2f} "
              f"{row['top1_agreement_pct']:6.2f}% " + " ".join(f"{row['images_per_s'][str(b)]:10,.0f}" for b in sizes))
    print(f"images/s: best of {args.rounds} rounds, {args.threads} threads; 1-min load average at the end {load}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
