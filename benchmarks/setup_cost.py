"""What the README's set-up costs: the virtual environment's size by part, and the main job's time after the install.

    python benchmarks/setup_cost.py                  # .venv of this checkout; the job in a temporary folder
    python benchmarks/setup_cost.py --venv /path/to/.venv --extras train,cpu,test,ray

The size is what is on disk under the venv (`du`'s way: allocated blocks, each file once), split into the parts
that make it big: torch's CUDA libraries (the nvidia-* packages, which torch's Linux wheel from PyPI requires even
on a machine without a GPU), torch itself, Triton, and the rest. The job is the `fmnist-onnx` steps of the
README's first command, each timed as a whole process in a fresh temporary folder, so nothing of this checkout's
artifacts/ is reused. Writes benchmarks/results/setup.json with the machine's description.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# site-packages entries by part, in the order shown; the rest is "everything else"
PARTS = {"torch's CUDA libraries (nvidia-*)": re.compile(r"nvidia"), "torch": re.compile(r"torch$|torch-"),
         "Triton": re.compile(r"triton")}


def disk_bytes(path: Path, seen: set[tuple[int, int]]) -> int:
    """Bytes allocated under path, each inode once (hard links), symlinks not followed."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def venv_size(venv: Path) -> dict:
    seen: set[tuple[int, int]] = set()
    site = next(venv.glob("lib/python3*/site-packages"))
    parts = dict.fromkeys(PARTS, 0)
    for entry in site.iterdir():
        part = next((k for k, rx in PARTS.items() if rx.match(entry.name.lower())), None)
        if part:
            parts[part] += disk_bytes(entry, seen) if entry.is_dir() else entry.lstat().st_blocks * 512
    total = disk_bytes(venv, seen) + sum(parts.values())
    return {"total_bytes": total, "parts": {**parts, "everything else": total - sum(parts.values())}}


def job_steps() -> list[str]:
    """The README's first command's fmnist-onnx steps, as written there."""
    first = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [s.strip() for s in first.split("&&") if s.strip().startswith(".venv/bin/fmnist-onnx")]


def time_job(venv: Path) -> dict:
    steps = []
    with tempfile.TemporaryDirectory(prefix="fmnist-setup-cost-") as tmp:
        os.symlink(venv, Path(tmp) / ".venv")
        for step in job_steps():
            start = time.perf_counter()
            subprocess.run(shlex.split(step), cwd=tmp, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            steps.append({"command": step, "seconds": round(time.perf_counter() - start, 1)})
            print(f"{steps[-1]['seconds']:7.1f} s  {step}", file=sys.stderr, flush=True)
    total = round(sum(s["seconds"] for s in steps), 1)
    return {"steps": steps, "total_s": total, "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv", help="[.venv of this checkout]")
    ap.add_argument("--extras", default="train,cpu,test,ray", help="the extras installed there, as recorded")
    ap.add_argument("--out", type=Path, default=RESULTS / "setup.json")
    args = ap.parse_args()

    from fmnist_onnx.bench import machine_info, save_json

    venv = args.venv.resolve()
    machine = machine_info()  # before the job: its load average says how busy the machine was
    result = {"venv": {"path": str(venv), "extras": args.extras, **venv_size(venv)}, "job": time_job(venv),
              "machine": machine}
    save_json(result, args.out, overwrite=True)  # a results file is replaced by the newer measurement
    print(f"{result['venv']['total_bytes'] / 1e9:.1f} GB, job {result['job']['total_s']:.0f} s. Wrote {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
