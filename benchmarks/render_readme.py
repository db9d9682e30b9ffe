"""Refresh the README's benchmark tables from benchmarks/results/*.json (between the benchmarks markers).

    python benchmarks/render_readme.py          # rewrites README.md in place
    python benchmarks/render_readme.py --print  # only prints the tables
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def machine_line(m: dict) -> str:
    v = m.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("onnxruntime", "onnxruntime-gpu", "torch", "numpy") if k in v)
    gpus = f", GPU {'; '.join(m['gpus'])}" if m.get("gpus") else ""
    flags = f" ({', '.join(m['cpu_flags'])})" if m.get("cpu_flags") else ""
    load = f"; load average {m['load_average'][0]} at the start" if m.get("load_average") else ""
    when = f"; {m['measured_at'][:10]}" if m.get("measured_at") else ""
    cores = m.get("usable_cores", m["cores"])
    return f"{m['cpu']}{flags}, {cores} cores, {m['memory_gib']} GiB{gpus}; {libs}{load}{when}"


def inference_section(d: dict) -> list[str]:
    label = lambda r: f"{r['backend']} {r['provider']} {r['precision']}" + (" iobinding" if r["io_binding"] else "")  # noqa: E731
    options = list(dict.fromkeys(label(r) for r in d["results"]))
    sizes = sorted({r["batch_size"] for r in d["results"]})
    cell = {(label(r), r["batch_size"]): r for r in d["results"]}
    out = ["### Inference: `python benchmarks/inference.py`", "", f"Machine: {machine_line(d['machine'])}.", ""]
    for prov, p in d["machine"]["peak"].items():
        by = ", ".join(f"{k} {g:.0f}" for k, g in p["by_method"].items())
        out.append(f"- {prov}: matrix-product peak {p['gflops']:.0f} GFLOP/s ({by}), so the fp32 roofline is "
                   f"{p['roofline_images_per_s']:,.0f} images/s (one forward = 1.34 MFLOP).")
    out += ["", "Images/s (median latency of one batch in ms); the fastest option per batch size in bold.", "",
            "| batch | " + " | ".join(options) + " |", "| ---: |" + " ---: |" * len(options)]
    for bs in sizes:
        best = max((r for r in d["results"] if r["batch_size"] == bs), key=lambda r: r["images_per_s"])
        cells = []
        for o in options:
            r = cell.get((o, bs))
            text = f"{r['images_per_s']:,.0f} ({r['latency_ms']['p50']:.3g})" if r else "-"
            cells.append(f"**{text}**" if r is best else text)
        out.append(f"| {bs} | " + " | ".join(cells) + " |")
    first = {o: max(r["first_run_ms"] for r in d["results"] if label(r) == o) for o in options}
    out += ["", "First run (session creation or weights load + first inference, kept out of the figures above), "
            "at most: " + ", ".join(f"{o} {ms:.0f} ms" for o, ms in first.items()) + "."]
    if "accuracy" in d:
        acc = d["accuracy"]["test_accuracy_pct"]
        out.append(f"Test accuracy (10,000 images): fp32 {acc['fp32']:.2f}%, int8 {acc['int8']:.2f}%.")
    if d.get("targets"):
        out += ["", "| target | measured (from mean latencies) | from median latencies | wanted | |",
                "| --- | ---: | ---: | ---: | --- |"]
        for t in d["targets"]:
            sign = "<=" if "lost" in t["target"] else ">="
            median = f"{t['median_value']:.2f}" if "median_value" in t else ""
            out.append(f"| {t['target']} | {t['value']:.2f} | {median} | {sign} {t['threshold']} | "
                       f"{'met' if t['met'] else '**missed**'} |")
    return out + ["", "![inference chart](benchmarks/results/inference.png)", ""]


def train_section(d: dict) -> list[str]:
    out = ["### Training: `python benchmarks/train_recipes.py`", "",
           f"Machine: {machine_line(d['machine'])}; device {d['device']}.", "",
           "| recipe | seeds | epochs | test accuracy (median, min-max) | wall time (median) |",
           "| --- | --- | ---: | ---: | ---: |"]
    for recipe, s in d["summary"].items():
        if not isinstance(s, dict):
            continue
        epochs = next(r["epochs"] for r in d["runs"] if r["recipe"] == recipe)
        out.append(f"| {recipe} | {','.join(map(str, s['seeds']))} | {epochs} | {s['median_test_accuracy']:.2f}% "
                   f"({s['min_test_accuracy']:.2f}-{s['max_test_accuracy']:.2f}) | {s['median_wall_s']:.1f} s |")
    if "fast_over_tutorial_time" in d["summary"]:
        out += ["", f"The fast recipe takes {d['summary']['fast_over_tutorial_time']:.2f}x the tutorial's time."]
    return out + [""]


def classify_section(d: dict) -> list[str]:
    out = ["### Classifying a folder: `fmnist-onnx bench classify DIR`", "",
           f"Machine: {machine_line(d['machine'])}; {d['images']:,} PNG files.", "",
           "| what | images/s |", "| --- | ---: |"]
    for row in d["results"]:
        out.append(f"| {row['what']} | {row['images_per_s']:,.0f} |")
    if d.get("scaling"):
        out += ["", "| decoding processes | images/s |", "| ---: | ---: |"]
        out += [f"| {r['processes']} | {r['images_per_s']:,.0f} |" for r in d["scaling"]]
    c = d.get("coordinator")
    if c:
        out += ["", f"The coordinator (the process that walks and writes) spends {c['cpu_us_per_file']:.2f} µs of CPU "
                    f"per file after {c['startup_cpu_s']:.2f} CPU-s of start-up: a ceiling of "
                    f"{c['ceiling_images_per_s']:,} images/s on any number of cores."]
    return out + [""]


def gpu_section(d: dict) -> list[str]:
    """benchmarks/gpu.sh's classify figures (results/gpu/): both providers on its PNGs, the variants, the scaling."""
    out = ["### On a GPU machine: `bash benchmarks/gpu.sh`", "",
           f"Machine: {machine_line(d['bench_classify_cuda.json']['machine'])}.", "",
           "| classify (the command as users run it) | files | seconds | images/s |", "| --- | ---: | ---: | ---: |"]
    for p in ("cuda", "cpu"):
        s = d.get(f"classify_{p}.json")
        if s:
            out.append(f"| `--provider {p}` ({s['workers']} workers) | {s['files']:,} | {s['seconds']:.2f} | "
                       f"{s['images_per_s']:,.0f} |")
    labels = re.search(r"^labels: .*$", d.get("gpu.log", ""), re.M)
    if labels:
        out += ["", f"Rows compared: {labels.group(0).removeprefix('labels: ')}."]
    if d.get("classify_variants.json"):
        out += ["", "Where the time goes (the same files, each best of two; CPU-s of the process that walks and "
                "writes, and of its workers and inference processes):", "",
                "| what | images/s | parent CPU-s | children CPU-s |", "| --- | ---: | ---: | ---: |"]
        for r in d["classify_variants.json"]:
            out.append(f"| {r['what']} | {r['images_per_s']:,.0f} | {r.get('parent_cpu_s', '')} | "
                       f"{r.get('children_cpu_s', '')} |")
    for p in ("cuda", "cpu"):
        b = d.get(f"bench_classify_{p}.json")
        if b and b.get("scaling"):
            c = b["coordinator"]
            curve = ", ".join(f"{r['processes']}: {r['images_per_s']:,.0f}" for r in b["scaling"])
            out += ["", f"`bench classify --provider {p} --scaling` on {b['images']:,} files: images/s by workers "
                        f"{curve}; the coordinator {c['cpu_us_per_file']:.2f} µs of CPU per file after "
                        f"{c['startup_cpu_s']:.2f} CPU-s of start-up."]
    return out + [""]


def render() -> str:
    parts: list[str] = []
    for name, section in (("inference.json", inference_section), ("train.json", train_section),
                          ("bench_classify.json", classify_section)):
        d = _load(name)
        if d is not None:
            parts += section(d)
    gpu = {p.name: (json.loads(p.read_text()) if p.suffix == ".json" else p.read_text())
           for p in sorted((RESULTS / "gpu").glob("*")) if p.suffix in (".json", ".log")}
    if "bench_classify_cuda.json" in gpu:
        parts += gpu_section(gpu)
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--print", action="store_true", help="print the tables instead of rewriting README.md")
    args = p.parse_args(argv)
    tables = render()
    if args.print:
        print(tables)
        return 0
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    tmp = readme.with_name(f".README.md.tmp{os.getpid()}")
    tmp.write_text(f"{head}{START}\n{tables}{END}{tail}")
    os.replace(tmp, readme)
    print(f"refreshed {readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
