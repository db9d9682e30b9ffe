"""`classify --engine ray` beside the local engine, on the same folder of PNG files, on this machine.

    python benchmarks/classify_ray.py                      # the 10,000 test PNGs, about two minutes on 2 cores
    python benchmarks/classify_ray.py --split train --repeats 3

Three contenders, each a fresh `fmnist-onnx classify` process timed from start to exit, on a warm page cache,
alternating, best of --repeats: the local engine; the Ray engine starting (and stopping) its own local
runtime, as `--engine ray` does with no address; and the Ray engine joining a Ray cluster already running
on this machine (`ray start --head`, as many CPUs as this machine has), which is how it runs on a real
cluster, without the runtime's start-up. Also the images/s that each run's summary reports (its own clock:
walking, classifying and writing; for Ray that includes connecting, not the final shutdown).
Writes benchmarks/results/classify_ray_SPLIT.json (one file per split, so the 60,000-file run never replaces the
10,000-file one; --folder: classify_ray_folder.json). Needs the [ray] extra.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from classify_vs_naive import count_and_warm, png_folder, prepare_model

RESULTS = Path(__file__).resolve().parent / "results"


def ray_processes(marker: str) -> list[int]:
    """Pids of the processes of a Ray session under ``marker`` (in their command line or open files)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            files = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        if marker in cmd or any(f.startswith(marker) for f in files):
            found.append(int(pid))
    return found


def start_cluster(env: dict, cpus: int) -> tuple[subprocess.Popen, str, str]:
    marker = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--num-cpus={cpus}",
         "--num-gpus=0", f"--port={port}", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={marker}/ray"],
        env={**env, "RAY_TMPDIR": marker, "RAY_AUTH_MODE": "token"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in head.stdout:
        if "--address=" in line:
            return head, line.split("--address=", 1)[1].split()[0].strip("'\""), marker
    raise SystemExit("ray start did not report an address")


def stop_cluster(head: subprocess.Popen, marker: str) -> None:
    os.killpg(head.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while ray_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in ray_processes(marker):
        os.kill(pid, signal.SIGKILL)
    head.wait(10)
    shutil.rmtree(marker, ignore_errors=True)


def run(cmd: list[str], env: dict) -> tuple[float, dict]:
    """(wall seconds start to exit, the summary's JSON)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, help="PNG folder [the --split, exported to a temporary folder]")
    ap.add_argument("--split", choices=["test", "train"], default="test", help="[test: 10,000 images]")
    ap.add_argument("--model", type=Path, help="ONNX model [artifacts/model.onnx, or trained and exported here]")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts [2]")
    ap.add_argument("--out", type=Path, help="[benchmarks/results/classify_ray_SPLIT.json]")
    args = ap.parse_args()

    args.out = args.out or RESULTS / f"classify_ray_{'folder' if args.folder else args.split}.json"
    import ray

    from fmnist_onnx.bench import machine_info, save_json

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="fmnist-ray-bench-") as tmp:
        work = Path(tmp)
        model = prepare_model(args.model, work)
        folder = png_folder(args.folder, args.split, work)
        n = count_and_warm(folder)
        # Ray's files and token in temporary folders, not in the user's /tmp/ray and ~/.ray
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        short = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
        env.update(RAY_TMPDIR=short, HOME=str(work), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_TOKEN=secrets.token_hex(32))
        head, address, marker = start_cluster(env, cores)
        try:
            base = [sys.executable, "-m", "fmnist_onnx", "classify", str(folder), "-m", str(model), "--overwrite",
                    "--quiet", "--json"]
            contenders = {
                "local": (base + ["-o", str(work / "local.csv")], env),
                "ray_local_runtime": (base + ["-o", str(work / "ray.csv"), "--engine", "ray"], env),
                "ray_running_cluster": (base + ["-o", str(work / "ray_cluster.csv"), "--engine", "ray",
                                                "--ray-address", address], {**env, "RAY_AUTH_MODE": "token"}),
            }
            walls: dict[str, list[float]] = {k: [] for k in contenders}
            inner: dict[str, list[float]] = {k: [] for k in contenders}
            for r in range(args.repeats):
                for name, (cmd, cmd_env) in contenders.items():
                    seconds, summary = run(cmd, cmd_env)
                    if summary["files"] != n:
                        raise SystemExit(f"{name} wrote {summary['files']} rows for {n} files")
                    walls[name].append(seconds)
                    inner[name].append(summary["images_per_s"])
                print(f"run {r + 1}: " + ", ".join(f"{k} {n / v[-1]:,.0f} images/s" for k, v in walls.items()),
                      file=sys.stderr, flush=True)
        finally:
            stop_cluster(head, marker)
            shutil.rmtree(short, ignore_errors=True)

    best = {k: min(v) for k, v in walls.items()}
    result = {
        "images": n,
        "folder": str(args.folder) if args.folder else f"{args.split} split exported by `fmnist-onnx data export-png`",
        "engines": {k: {"seconds": round(best[k], 3), "images_per_s": round(n / best[k], 1),
                        "runs_s": [round(s, 3) for s in walls[k]],
                        "summary_images_per_s": max(inner[k]),
                        "command": " ".join(contenders[k][0][1:])} for k in walls},
        "local_over_ray_local_runtime": round(best["ray_local_runtime"] / best["local"], 2),
        "local_over_ray_running_cluster": round(best["ray_running_cluster"] / best["local"], 2),
        "ray_version": ray.__version__,
        "load_average": os.getloadavg(),
        "timing": "wall clock of each whole process, start to exit, warm page cache; best of the repeats",
        "machine": machine_info(),
    }
    save_json(result, args.out)
    e = result["engines"]
    print(f"{n} PNG files on {cores} cores: local {e['local']['images_per_s']:,.0f} images/s; Ray with its own "
          f"runtime {e['ray_local_runtime']['images_per_s']:,.0f} ({result['local_over_ray_local_runtime']:.1f}x "
          f"slower); Ray on a running cluster {e['ray_running_cluster']['images_per_s']:,.0f} "
          f"({result['local_over_ray_running_cluster']:.1f}x slower); load average {os.getloadavg()[0]:.1f}. "
          f"Wrote {args.out}")


if __name__ == "__main__":
    main()
