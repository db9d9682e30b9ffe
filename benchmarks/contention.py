"""Fair-share speed on a busy machine: each command quiet and beside k busy processes, against (n+k)/n its quiet time.

    python benchmarks/contention.py                # train 3 epochs, export+verify, classify, bench classify
    python benchmarks/contention.py --repeats 9 --setting default --setting spinning    # the tool against the old waits
    python benchmarks/contention.py --epochs 1 --limit 2000 --repeats 1 --out /tmp/c.json   # a quick try

On n usable cores, k = n processes `python -c 'while 1: pass'` (nice 0) run beside the command in its busy runs;
a process that shares the cores fairly then takes (n+k)/n its quiet time (2x for k = n). Each command runs as a
whole process (`python -m fmnist_onnx ...`), quiet and busy alternating within each repeat, every setting in turn;
the figures are medians over the repeats and their ratio to that fair share (issue 28: at most 1.5).

A setting is a name and environment variables for the command. `default`: the tool as it is (its threads sleep at
a barrier: GOMP_SPINCOUNT=10000, onnxruntime's session.intra_op.allow_spinning 0); `spinning`: the libraries' own
waits, as before issue 28 (libgomp's default spin count, 300,000, and onnxruntime's spinning pool); or
NAME:VAR=VALUE,VAR=VALUE. Writes benchmarks/results/contention.json with the machine's description.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRESETS = {"default": {}, "spinning": {"GOMP_SPINCOUNT": "300000", "FMNIST_ONNX_ORT_SPIN": "1"}}
CLI = [sys.executable, "-m", "fmnist_onnx"]


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    if text in PRESETS:
        return text, PRESETS[text]
    name, _, pairs = text.partition(":")
    env = dict(p.split("=", 1) for p in pairs.split(",") if p)
    if not name or not env:
        raise SystemExit(f"--setting {text!r}: a preset ({', '.join(PRESETS)}) or NAME:VAR=VALUE,...")
    return name, env


def commands(work: Path, epochs: int) -> dict[str, list[list[str]]]:
    """Each measured command: one or more processes run one after the other (export, then verify)."""
    model, weights, pngs = work / "model.onnx", work / "model.pth", work / "pngs"
    return {
        f"train --epochs {epochs}": [[*CLI, "train", "--epochs", str(epochs), "--out-dir", str(work / "train"),
                                      "--overwrite", "--quiet"]],
        "export + verify": [[*CLI, "export", "--weights", str(weights), "-o", str(work / "e.onnx"), "--no-verify",
                             "--overwrite"],
                            [*CLI, "verify", "-m", str(work / "e.onnx"), "--weights", str(weights)]],
        "classify": [[*CLI, "classify", str(pngs), "-m", str(model), "-o", str(work / "out.csv"), "--overwrite",
                      "--quiet"]],
        "bench classify": [[*CLI, "bench", "classify", str(pngs), "-m", str(model), "--quiet"]],
    }


def prepare(work: Path, limit: int | None) -> None:
    """A model (one epoch: these figures are times, not accuracy), its ONNX file and the test PNGs."""
    steps = [[*CLI, "train", "--epochs", "1", "--out-dir", str(work), "--quiet"],
             [*CLI, "export", "--weights", str(work / "model.pth"), "-o", str(work / "model.onnx"), "--no-verify"],
             [*CLI, "data", "export-png", "--out", str(work / "pngs"), "--quiet",
              *(["--limit", str(limit)] if limit else [])]]
    for step in steps:
        subprocess.run(step, check=True, stdout=subprocess.DEVNULL)


def timed(steps: list[list[str]], env: dict[str, str]) -> float:
    start = time.perf_counter()
    for step in steps:
        subprocess.run(step, check=True, env=os.environ | env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


class Busy:
    """k processes that only burn CPU, started before a busy run and killed after it."""

    def __init__(self, k: int) -> None:
        self.k, self.procs = k, []

    def __enter__(self) -> Busy:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(self.k)]
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def measure(cmds: dict, settings: dict, k: int, repeats: int) -> dict:
    times = {(c, s, mode): [] for c in cmds for s in settings for mode in ("quiet", "busy")}
    for r in range(repeats):
        for c, steps in cmds.items():
            for s, env in settings.items():
                modes = ("quiet", "busy") if r % 2 == 0 else ("busy", "quiet")  # neither always goes first
                for mode in modes:
                    if mode == "busy":
                        with Busy(k):
                            times[c, s, mode].append(timed(steps, env))
                    else:
                        times[c, s, mode].append(timed(steps, env))
                print(f"repeat {r + 1}/{repeats}  {c:<22} {s:<10} quiet {times[c, s, 'quiet'][-1]:7.1f} s  "
                      f"busy {times[c, s, 'busy'][-1]:7.1f} s", file=sys.stderr, flush=True)
    return times


def summarize(times: dict, cmds: dict, settings: dict, n: int, k: int) -> list[dict]:
    rows = []
    for c in cmds:
        for s in settings:
            quiet, busy = statistics.median(times[c, s, "quiet"]), statistics.median(times[c, s, "busy"])
            fair = (n + k) / n * quiet
            rows.append({"command": c, "setting": s, "quiet_s": [round(t, 2) for t in times[c, s, "quiet"]],
                         "busy_s": [round(t, 2) for t in times[c, s, "busy"]], "quiet_median_s": round(quiet, 2),
                         "busy_median_s": round(busy, 2), "fair_share_s": round(fair, 2),
                         "busy_over_fair_share": round(busy / fair, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="quiet/busy pairs of each command and setting [5]")
    ap.add_argument("--epochs", type=int, default=3, help="train's epochs [3]")
    ap.add_argument("--limit", type=int, help="only the first N test PNGs for classify [all 10,000]")
    ap.add_argument("--busy", type=int, help="k: busy processes beside the command [usable cores]")
    ap.add_argument("--setting", action="append", help="repeatable: default, spinning or NAME:VAR=VALUE,... "
                                                        "[default]")
    ap.add_argument("--only", action="append", help="repeatable: measure only commands starting with this")
    ap.add_argument("--out", type=Path, default=RESULTS / "contention.json")
    args = ap.parse_args()

    from fmnist_onnx.bench import machine_info, save_json
    from fmnist_onnx.machine import usable_cores

    n = usable_cores()
    k = args.busy or n
    settings = dict(parse_setting(s) for s in args.setting or ["default"])
    machine = machine_info()  # before the runs: its load average says how busy the machine was already
    with tempfile.TemporaryDirectory(prefix="fmnist-contention-") as tmp:
        work = Path(tmp)
        prepare(work, args.limit)
        cmds = {c: s for c, s in commands(work, args.epochs).items()
                if not args.only or any(c.startswith(o) for o in args.only)}
        times = measure(cmds, settings, k, args.repeats)
    rows = summarize(times, cmds, settings, n, k)
    result = {"cores": n, "busy_processes": k, "repeats": args.repeats, "epochs": args.epochs,
              "test_pngs": args.limit or 10000, "settings": settings, "results": rows,
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "machine": machine}
    save_json(result, args.out, overwrite=True)
    for r in rows:
        print(f"{r['command']:<22} {r['setting']:<10} quiet {r['quiet_median_s']:7.1f} s  busy "
              f"{r['busy_median_s']:7.1f} s  fair share {r['fair_share_s']:7.1f} s  {r['busy_over_fair_share']:.2f}x")
    print(f"Wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
