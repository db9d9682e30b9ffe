"""The default `fmnist-onnx bench` against the full sweep: is each row of the short run the figure the long one gives?

    python benchmarks/bench_default.py                       # artifacts/model.onnx (int8 and model.pth beside)
    python benchmarks/bench_default.py --model m.onnx --pairs 5

Runs `fmnist-onnx bench` (the default: batch sizes 1, 64, 1024, 1 s each) and `fmnist-onnx bench --full` (the old
default: 1, 8, 64, 256, 1024, 2 s each) as whole processes, in interleaved pairs (the order alternates, so a
machine that gets busier favours neither), and prints per row of the default run the median images/s of each
over the pairs and their ratio (default / full; the target: within 5%), with each run's wall time and how busy
the machine was (machine.busy). Writes benchmarks/results/bench_default.json with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fmnist_onnx.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = {"default": [], "full": ["--full"]}


def run(kind: str, model: Path, out: Path) -> dict:
    """One bench process: its JSON, with the wall time of the whole process."""
    cmd = [sys.executable, "-m", "fmnist_onnx", "bench", "-m", str(model), "--provider", "cpu", "--json", str(out),
           "--overwrite", "--quiet", *RUNS[kind]]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    data["wall_s"] = time.perf_counter() - start
    return data


def key(r: dict) -> str:
    return f"{r['backend']} {r['provider']} {r['precision']}{' iobinding' if r['io_binding'] else ''} batch " \
           f"{r['batch_size']}"


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Per row of the default run: the median images/s of each kind over the pairs, and default / full."""
    rows = []
    for k in (key(r) for r in runs["default"][0]["results"]):
        med = {kind: statistics.median(next(r["images_per_s"] for r in d["results"] if key(r) == k)
                                       for d in runs[kind]) for kind in RUNS}
        rows.append({"row": k, "default_images_per_s": round(med["default"], 1),
                     "full_images_per_s": round(med["full"], 1), "ratio": round(med["default"] / med["full"], 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("artifacts/model.onnx"))
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_default.json")
    args = p.parse_args(argv)
    if not args.model.is_file():
        p.error(f"{args.model} not found: run fmnist-onnx train and export --quantize int8 first")

    runs: dict[str, list[dict]] = {kind: [] for kind in RUNS}
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-default-") as tmp:
        for i in range(args.pairs):
            for kind in (("default", "full") if i % 2 == 0 else ("full", "default")):
                runs[kind].append(run(kind, args.model, Path(tmp) / f"{kind}.json"))
                busy = runs[kind][-1]["machine"].get("busy") or {}
                print(f"pair {i + 1}: {kind:<7} {runs[kind][-1]['wall_s']:6.1f} s, other processes used "
                      f"{busy.get('other_cores', float('nan')):.1f} cores", file=sys.stderr, flush=True)

    rows = summarize(runs)
    walls = {kind: [round(d["wall_s"], 1) for d in runs[kind]] for kind in RUNS}
    busy = {kind: [(d["machine"].get("busy") or {}).get("other_cores") for d in runs[kind]] for kind in RUNS}
    result = {"machine": machine_info(), "model": str(args.model), "pairs": args.pairs,
              "commands": {kind: " ".join(["fmnist-onnx bench", *RUNS[kind]]) for kind in RUNS},
              "wall_s": walls, "other_cores": busy, "rows": rows,
              "worst_ratio": max((r["ratio"] for r in rows), key=lambda x: abs(x - 1)),
              "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'row':<36} {'default':>10} {'full':>10} {'ratio':>7}   (median images/s of {args.pairs} pairs)")
    for r in rows:
        flag = "" if abs(r["ratio"] - 1) <= 0.05 else "  > 5%"
        print(f"{r['row']:<36} {r['default_images_per_s']:>10,.0f} {r['full_images_per_s']:>10,.0f} "
              f"{r['ratio']:>7.3f}{flag}")
    for kind in RUNS:
        print(f"{kind}: wall {statistics.median(walls[kind]):.1f} s (median; {walls[kind]}), other processes used "
              f"{busy[kind]} cores")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
