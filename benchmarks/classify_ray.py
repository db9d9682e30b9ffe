"""`classify --engine ray` beside the local engine, on the same folders of PNG files, on this machine.

    python benchmarks/classify_ray.py                      # the 10,000 test PNGs
    python benchmarks/classify_ray.py --folder f12k --folder f120k --repeats 3   # steady state and fixed cost

Three contenders, each a fresh `fmnist-onnx classify` process timed from start to exit, on a warm page cache,
alternating (every folder and contender once per repeat, so that the machine's load falls on all alike): the
local engine; the Ray engine starting (and stopping) its own local runtime, as `--engine ray` does with no
address; and the Ray engine joining a Ray cluster already running on this machine (`ray start --head`, as many
CPUs as this process may use), which is how it runs on a real cluster, without the runtime's start-up.

Each run is also measured in CPU seconds: the command's and its descendants' (the local engine's workers, a
local Ray runtime), and the running cluster's processes' while it runs (sampled). On a machine that other work
shares, wall times depend on the load, which need not fall alike on engines of different shapes; CPU seconds
do not, and tell the engines' costs apart where the wall times cannot (for a whole process, not its waits).

Writes one file per folder measured, benchmarks/results/classify_ray_<files>.json (best of the repeats, every
run's seconds, the machine, the date, the load average), and with two folders or more,
classify_ray_steady_state.json: per contender, the steady state (the largest folder's files less the
smallest's, over the difference of their times) and the fixed cost (the smallest folder's time less its files
at that rate), from the best times and from each repeat alone (the spread says how noisy the machine was), the
same from CPU seconds, and each Ray contender's steady state as a share of the local engine's. Needs the [ray]
extra. ``--tree DIR`` runs every process, the cluster's too, on the fmnist_onnx of another source tree (a
baseline: `git archive <commit> | tar -x -C DIR`), ``--tag`` names its files apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from classify_vs_naive import count_and_warm, png_folder, prepare_model

RESULTS = Path(__file__).resolve().parent / "results"
CONTENDERS = ("local", "ray_local_runtime", "ray_running_cluster")


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


def start_cluster(env: dict, cpus: int, cwd: Path | None) -> tuple[subprocess.Popen, str, str]:
    marker = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--num-cpus={cpus}",
         "--num-gpus=0", f"--port={port}", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={marker}/ray"], cwd=cwd,
        env={**env, "RAY_TMPDIR": marker, "RAY_AUTH_MODE": "token"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, process_group=0)  # a group of its own, in this session: see run
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


def tree_cpu(roots: set[int]) -> dict[int, float]:
    """CPU seconds per live process among ``roots`` and their descendants."""
    stats = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(pid)] = (int(fields[1]), sum(int(f) for f in fields[11:13]))  # ppid; utime + stime
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [r for r in roots if r in stats]
    while todo:
        pid = todo.pop()
        out[pid] = stats[pid][1] / os.sysconf("SC_CLK_TCK")
        todo += children.get(pid, [])
    return out


class TreeCPU:
    """The CPU seconds that some processes and their descendants spend from now on, sampled every 0.1 s (a
    process's last tenth of a second is lost: the actors exit with their job, unwaited)."""

    def __init__(self, roots: set[int]) -> None:
        self.roots, self.base = roots, tree_cpu(roots)
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stop.wait(0.1):
            self.seen.update(tree_cpu(self.roots))

    def seconds(self) -> float:
        self.stop.set()
        self.thread.join()
        self.seen.update(tree_cpu(self.roots))
        return sum(v - self.base.get(pid, 0.0) for pid, v in self.seen.items())


def run(cmd: list[str], env: dict, cwd: Path | None, cluster: int | None) -> tuple[float, float, dict]:
    """(wall seconds start to exit; CPU seconds of the command's processes (a local Ray runtime's too), and of
    the ``cluster`` process's descendants while it runs; the summary's JSON). CPU seconds do not depend on what
    else the machine runs, as wall seconds do. Every process stays in this session: with the kernel's
    autogroup scheduling, a session of its own would get a share of the CPUs of its own on a loaded machine."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    cpu = TreeCPU({proc.pid} | ({cluster} if cluster else set()))
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    cpu_s = cpu.seconds()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return seconds, cpu_s, json.loads(stdout)


def contenders_for(names: list[str], model: Path, work: Path, env: dict, address: str | None) -> dict:
    """name -> (the command less its folder, its environment)."""
    base = [sys.executable, "-m", "fmnist_onnx", "classify", "-m", str(model), "--overwrite", "--quiet", "--json"]
    table = {
        "local": (base + ["-o", str(work / "local.csv")], env),
        "ray_local_runtime": (base + ["-o", str(work / "ray.csv"), "--engine", "ray"], env),
        "ray_running_cluster": (base + ["-o", str(work / "ray_cluster.csv"), "--engine", "ray",
                                        "--ray-address", str(address)], {**env, "RAY_AUTH_MODE": "token"}),
    }
    return {k: table[k] for k in names}


def measure(folders: dict[Path, int], contenders: dict, repeats: int, cwd: Path | None, sid: int | None) -> dict:
    """{folder: {contender: ([seconds per repeat], [summary images/s per repeat], [CPU seconds per repeat])}},
    alternating."""
    got = {f: {k: ([], [], []) for k in contenders} for f in folders}
    for r in range(repeats):
        for folder, n in folders.items():
            for name, (cmd, cmd_env) in contenders.items():
                seconds, cpu, summary = run(cmd + [str(folder.resolve())], cmd_env, cwd,
                                            sid if name == "ray_running_cluster" else None)
                if summary["files"] != n:
                    raise SystemExit(f"{name} wrote {summary['files']} rows for {n} files")
                got[folder][name][0].append(seconds)
                got[folder][name][1].append(summary["images_per_s"])
                got[folder][name][2].append(cpu)
            print(f"repeat {r + 1}, {n} files: " + ", ".join(f"{k} {v[0][-1]:.2f} s" for k, v in got[folder].items()),
                  file=sys.stderr, flush=True)
    return got


def folder_result(n: int, label: str, runs: dict, contenders: dict, context: dict) -> dict:
    best = {k: min(v[0]) for k, v in runs.items()}
    result = {
        "measured": f"classify of {n} PNG files, whole processes: the local engine and the Ray engine",
        "images": n,
        "folder": label,
        "engines": {k: {"seconds": round(best[k], 3), "images_per_s": round(n / best[k], 1),
                        "runs_s": [round(s, 3) for s in runs[k][0]],
                        "summary_images_per_s": max(runs[k][1]),
                        "cpu_s": [round(s, 2) for s in runs[k][2]],
                        "command": " ".join(contenders[k][0][1:] + ["<folder>"])} for k in runs},
    }
    if "local" in best:
        result["seconds_over_local"] = {k: round(best[k] / best["local"], 2) for k in best if k != "local"}
    return {**result, **context}


def steady_state(small: tuple[int, dict], big: tuple[int, dict], context: dict, sources: list[str]) -> dict:
    """Steady state and fixed cost per contender, from the best times and from each repeat alone."""
    (n0, r0), (n1, r1) = small, big

    def fit(t0: float, t1: float) -> tuple[float, float]:
        rate = (n1 - n0) / (t1 - t0)
        return rate, t0 - n0 / rate

    engines = {}
    for k in r0:
        rate, fixed = fit(min(r0[k][0]), min(r1[k][0]))
        per = [fit(a, b) for a, b in zip(r0[k][0], r1[k][0], strict=True)]
        cpu = fit(min(r0[k][2]), min(r1[k][2]))  # images per CPU second, CPU seconds
        engines[k] = {"steady_images_per_s": round(rate, 1), "fixed_s": round(fixed, 3),
                      "per_repeat_steady_images_per_s": [round(p[0], 1) for p in per],
                      "per_repeat_fixed_s": [round(p[1], 3) for p in per],
                      "steady_images_per_cpu_s": round(cpu[0], 1), "fixed_cpu_s": round(cpu[1], 3)}
    result = {
        "measured": f"steady state ({n1} files less {n0}, over the difference of the times) and fixed cost (the "
                    f"{n0}-file run less its files at that rate), best of the repeats and each repeat alone",
        "from": sources,
        "engines": engines,
    }
    if "local" in engines:
        local = engines["local"]
        result["steady_over_local"] = {
            k: {"best": round(v["steady_images_per_s"] / local["steady_images_per_s"], 3),
                "per_repeat": [round(a / b, 3) for a, b in zip(v["per_repeat_steady_images_per_s"],
                                                               local["per_repeat_steady_images_per_s"], strict=True)],
                "per_cpu_second": round(v["steady_images_per_cpu_s"] / local["steady_images_per_cpu_s"], 3)}
            for k, v in engines.items() if k != "local"}
    return {**result, **context}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, action="append",
                    help="PNG folder; give two or more for the steady state [the --split, exported]")
    ap.add_argument("--split", choices=["test", "train"], default="test", help="[test: 10,000 images]")
    ap.add_argument("--model", type=Path, help="ONNX model [artifacts/model.onnx, or trained and exported here]")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each; the best counts [3]")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated, of {', '.join(CONTENDERS)}")
    ap.add_argument("--tree", type=Path, help="run the fmnist_onnx of this source tree (a baseline)")
    ap.add_argument("--tag", default="", help="in the results' names: classify_ray_<tag>_<files>.json")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the results [benchmarks/results]")
    args = ap.parse_args()
    names = [c for c in args.contenders.split(",") if c]
    if not names or set(names) - set(CONTENDERS):
        ap.error(f"--contenders: of {', '.join(CONTENDERS)}")

    import ray

    from fmnist_onnx.bench import save_json
    from fmnist_onnx.machine import machine_info

    cores = len(os.sched_getaffinity(0))
    stem = "classify_ray" + (f"_{args.tag}" if args.tag else "")
    with tempfile.TemporaryDirectory(prefix="fmnist-ray-bench-") as tmp:
        work = Path(tmp)
        model = prepare_model(args.model, work).resolve()
        folders = {f: count_and_warm(f) for f in (args.folder or [png_folder(None, args.split, work)])}
        folders = dict(sorted(folders.items(), key=lambda kv: kv[1]))
        # Ray's files and token in temporary folders, not in the user's /tmp/ray and ~/.ray
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # `python -m` imports from the current folder first, and Ray's workers from the driver's: both run there
        tree = args.tree.resolve() if args.tree else None
        if tree:
            env["PYTHONPATH"] = str(tree)
        short = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
        env.update(RAY_TMPDIR=short, HOME=str(work), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_TOKEN=secrets.token_hex(32))
        head = address = marker = None
        if "ray_running_cluster" in names:
            head, address, marker = start_cluster(env, cores, tree)
        load_before = os.getloadavg()
        try:
            contenders = contenders_for(names, model, work, env, address)
            got = measure(folders, contenders, args.repeats, tree, head.pid if head else None)
        finally:
            if head is not None:
                stop_cluster(head, marker)
            shutil.rmtree(short, ignore_errors=True)

    context = {
        "tree": str(args.tree) if args.tree else "this checkout",
        "cores": cores,
        "ray_version": ray.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "timing": f"wall clock of each whole process, start to exit, warm page cache; {args.repeats} repeats, "
                  "alternating; best of the repeats",
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": machine_info(),
    }
    written = []
    for folder, n in folders.items():
        label = str(folder) if args.folder else f"{args.split} split exported by `fmnist-onnx data export-png`"
        written.append(save_json(folder_result(n, label, got[folder], contenders, context),
                                 args.results / f"{stem}_{n}.json", overwrite=True).name)
        e = got[folder]
        print(f"{n} files on {cores} cores: " + ", ".join(f"{k} {n / min(v[0]):,.0f} images/s"
                                                          for k, v in e.items()), file=sys.stderr)
    if len(folders) >= 2:
        (small, n0), (big, n1) = list(folders.items())[0], list(folders.items())[-1]
        result = steady_state((n0, got[small]), (n1, got[big]), context, written[:1] + written[-1:])
        save_json(result, args.results / f"{stem}_steady_state.json", overwrite=True)
        for k, v in result["engines"].items():
            share = result.get("steady_over_local", {}).get(k)
            print(f"{k}: steady {v['steady_images_per_s']:,.0f} images/s (repeats: "
                  f"{', '.join(f'{x:,.0f}' for x in v['per_repeat_steady_images_per_s'])})"
                  + (f", {share['best']:.2f}x local (repeats: {share['per_repeat']}; per CPU second: "
                     f"{share['per_cpu_second']:.2f}x)" if share else "")
                  + f"; fixed {v['fixed_s']:.2f} s (repeats: {v['per_repeat_fixed_s']}); "
                  f"{v['steady_images_per_cpu_s']:,.0f} images per CPU second, fixed {v['fixed_cpu_s']:.2f} CPU s",
                  file=sys.stderr)
    print(f"wrote {', '.join(written)} in {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
