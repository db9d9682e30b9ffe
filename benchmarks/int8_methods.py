"""int8 variants side by side: top-1 agreement with PyTorch, exact ties, accuracy and speed, in one run.

    python benchmarks/int8_methods.py                    # about 2 min
    python benchmarks/int8_methods.py --rounds 3 --batch-sizes 1,256

The measurement behind export's int8 default. Uses artifacts/model.pth (--weights); where it is missing it
trains the fast recipe (seed 0) in a temporary folder. Exports it and quantizes it each way below, then:

- on the 10,000 test images (fmnist_onnx.verify): test accuracy, top-1 agreement with PyTorch, and the images
  whose top logit is an exact tie between two classes (argmax then picks the first, whatever the model meant);
- images/s on the CPU at each batch size: the variants interleaved, the best of --rounds rounds (the least
  disturbed by other work on the machine);
- at batch 256, the CPU time of one call on one thread, as images/s per core: other processes on the same
  cores delay a call but hardly change the CPU time it takes, so this is the fairer speed comparison on a busy
  machine.

Writes benchmarks/results/int8_methods.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (method, keyword arguments of export.quantize_int8); "before" is the static default until the logits
# were kept in float.
VARIANTS = {
    "dynamic": ("dynamic", {}),
    "static, before (per-tensor weights, uint8 logits)": ("static", {"per_channel": False, "float_logits": False}),
    "static, per-tensor weights, float logits": ("static", {"per_channel": False, "float_logits": True}),
    "static, per-channel weights, float logits": ("static", {"per_channel": True, "float_logits": True}),
}
BEFORE = "static, before (per-tensor weights, uint8 logits)"


def images_per_s(session, x, seconds: float) -> float:
    session.run(None, {"input": x})  # warm-up, not timed
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        session.run(None, {"input": x})
        n += 1
    return n * len(x) / elapsed


def cpu_images_per_s(session, x, calls: int = 30) -> float:
    """Images/s of one core from the CPU time of the fastest call (one intra-op thread: it runs in this one)."""
    session.run(None, {"input": x})
    best = min(_thread_seconds(session, x) for _ in range(calls))
    return len(x) / best


def _thread_seconds(session, x) -> float:
    t0 = time.thread_time()
    session.run(None, {"input": x})
    return time.thread_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=Path("artifacts/model.pth"))
    ap.add_argument("--batch-sizes", default="1,256,1024")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5, help="timed seconds per variant, batch size and round")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=RESULTS / "int8_methods.json")
    args = ap.parse_args()

    import onnxruntime as ort

    from fmnist_onnx.bench import save_json
    from fmnist_onnx.export import export_onnx, quantize_int8
    from fmnist_onnx.machine import machine_info
    from fmnist_onnx.verify import verify

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = args.weights
        if not weights.is_file():
            from fmnist_onnx.train import make_config, train

            print(f"{weights} not found: training the fast recipe (seed 0)", file=sys.stderr, flush=True)
            weights = train(make_config("fast", seed=0), work / "trained").out_dir / "model.pth"
        models = {"fp32": export_onnx(weights, work / "model.onnx")}
        for i, (name, (method, options)) in enumerate(VARIANTS.items()):
            t0 = time.perf_counter()
            models[name] = quantize_int8(models["fp32"], work / f"model.{i}.onnx", method=method, **options)
            print(f"{name}: quantized in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

        rows = {}
        for name, path in models.items():
            report = verify(path, weights, ("cpu",))
            r = report.results[0]
            rows[name] = {"quantization": ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                          .get_modelmeta().custom_metadata_map.get("quantization", "fp32"),
                          "test_accuracy_pct": r.onnx_accuracy_pct, "accuracy_change_points": r.accuracy_change_points,
                          "top1_agreement_pct": r.top1_agreement_pct, "top1_ties": r.top1_ties,
                          "max_abs_logit_diff": r.max_abs_diff, "file_size_bytes": path.stat().st_size,
                          "images_per_s": {}}

        def session(path: Path, threads: int):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        sessions = {name: session(path, args.threads) for name, path in models.items()}
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        x = np.random.default_rng(0).random((max(sizes + [256]), 1, 28, 28), dtype=np.float32)
        for _ in range(args.rounds):
            for b in sizes:
                for name, sess in sessions.items():
                    ips = images_per_s(sess, x[:b], args.seconds)
                    best = rows[name]["images_per_s"]
                    best[str(b)] = max(best.get(str(b), 0.0), ips)
        one_thread = {name: session(path, 1) for name, path in models.items()}
        for _ in range(args.rounds):
            for name, sess in one_thread.items():
                rows[name]["cpu_images_per_s_per_core_256"] = max(rows[name].get("cpu_images_per_s_per_core_256", 0.0),
                                                                  cpu_images_per_s(sess, x[:256]))

    before = rows[BEFORE]
    for row in rows.values():
        row["speed_vs_before_256"] = row["images_per_s"].get("256", np.nan) / before["images_per_s"].get("256", np.nan)
        row["cpu_speed_vs_before_256"] = row["cpu_images_per_s_per_core_256"] / before["cpu_images_per_s_per_core_256"]
    machine = machine_info()
    result = {"machine": machine, "threads": args.threads, "rounds": args.rounds,
              "seconds_per_measurement": args.seconds, "weights": str(args.weights), "variants": rows}

    width = max(map(len, rows))
    print(f"{'':{width}} {'accuracy':>9} {'vs torch':>8} {'agree':>7} {'ties':>5} "
          + " ".join(f"{'b' + str(b):>9}" for b in sizes) + f" {'b256/core':>10} {'vs before':>16}")
    for name, row in rows.items():
        ips = " ".join(f"{row['images_per_s'][str(b)]:9,.0f}" for b in sizes)
        print(f"{name:{width}} {row['test_accuracy_pct']:8.2f}% {row['accuracy_change_points']:+8.2f} "
              f"{row['top1_agreement_pct']:6.2f}% {row['top1_ties']:5d} {ips} "
              f"{row['cpu_images_per_s_per_core_256']:10,.0f} "
              f"{row['speed_vs_before_256']:6.2f} / {row['cpu_speed_vs_before_256']:4.2f}")
    print(f"images/s: best of {args.rounds} rounds, {args.threads} threads; b256/core: CPU time on 1 thread; "
          f"vs before: images/s at batch 256 / per core, against '{BEFORE}'. Load average at the end "
          f"{machine['load_average']}; {machine['cpu']} ({', '.join(machine['cpu_flags'])})")
    save_json(result, args.out, overwrite=True)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
