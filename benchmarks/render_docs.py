"""Render every figure on README.md and docs/*.md from benchmarks/results/ (one file per measurement).

    python benchmarks/render_docs.py           # rewrites the pages in place
    python benchmarks/render_docs.py --check   # exit 1, naming page and section, where a page and its results disagree
    python benchmarks/render_docs.py --print   # prints every section

A page holds a rendered section between `<!-- figures: NAME -->` and `<!-- /figures: NAME -->`; NAME is a key of
SECTIONS. Every section names its results files, and each of those records its machine and date: a figure typed
into a page by hand has no such markers, and a section whose results are gone fails the check.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKERS = re.compile(r"(<!-- figures: (?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /figures: (?P=name) -->)", re.S)


def _load(name: str) -> dict:
    path = RESULTS / name
    if not path.is_file():
        raise LookupError(f"benchmarks/results/{name} is missing")
    d = json.loads(path.read_text())
    m = d.get("machine") or {}
    if not (m.get("cpu") and m.get("measured_at")):
        raise LookupError(f"benchmarks/results/{name} does not record its machine and date")
    return d


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def machine_line(m: dict) -> str:
    v = m.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("onnxruntime", "onnxruntime-gpu", "torch", "numpy") if k in v)
    gpus = f", GPU {'; '.join(m['gpus'])}" if m.get("gpus") else ""  # e.g. "NVIDIA H100 80GB HBM3, 81559 MiB"
    flags = f" ({', '.join(m['cpu_flags'])})" if m.get("cpu_flags") else ""
    load = f"; load average {m['load_average'][0]} at the start" if m.get("load_average") else ""
    when = f"; {m['measured_at'][:10]}" if m.get("measured_at") else ""
    cores = m.get("usable_cores", m["cores"])
    return f"{m['cpu']}{flags}, {cores} cores, {m['memory_gib']} GiB{gpus}; {libs}{load}{when}"


def inference_section() -> list[str]:
    d = _load("inference.json")
    if not int8_is_current(d):
        d = {**d, "results": [r for r in d["results"] if r["precision"] != "int8"],
             "targets": [t for t in d.get("targets", []) if "int8" not in t["target"]]}
        d.pop("accuracy", None)
        return [STALE_INT8, "", *_inference(d)]
    return _inference(d)


STALE_INT8 = ("The int8 rows of this run are left out: they measured an earlier int8 model (per-tensor weights, "
              "uint8 logits), not today's default; `python benchmarks/inference.py` measures both again.")


def int8_is_current(d: dict) -> bool:
    """Whether a bench run's int8 model was made the way export makes it today (its note says how it was made)."""
    notes = [n for n in d.get("notes", []) if n.startswith("int8 model")]
    return any("per output channel" in n and "last layer in float" in n for n in notes)


def _inference(d: dict) -> list[str]:
    label = lambda r: f"{r['backend']} {r['provider']} {r['precision']}" + (" iobinding" if r["io_binding"] else "")  # noqa: E731
    options = list(dict.fromkeys(label(r) for r in d["results"]))
    sizes = sorted({r["batch_size"] for r in d["results"]})
    cell = {(label(r), r["batch_size"]): r for r in d["results"]}
    out = [f"Machine: {machine_line(d['machine'])}.", ""]
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
    return out


def train_section() -> list[str]:
    d = _load("train.json")
    out = [f"Machine: {machine_line(d['machine'])}; device {d['device']}.", "",
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
    return out


def contention_section() -> list[str]:
    d = _load("contention.json")
    n, k = d["cores"], d["busy_processes"]
    out = [f"Machine: {machine_line(d['machine'])}; {k} busy processes beside each command on {n} cores (fair "
           f"share: {(n + k) / n:g}x the quiet time); medians of {d['repeats']} quiet/busy pairs; classify on "
           f"{d['test_pngs']:,} test PNGs.", "",
           "| command | setting | quiet | busy | fair share | busy / fair share |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in d["results"]:
        out.append(f"| `{r['command']}` | {r['setting']} | {r['quiet_median_s']:.1f} s | {r['busy_median_s']:.1f} s "
                   f"| {r['fair_share_s']:.1f} s | {r['busy_over_fair_share']:.2f}x |")
    return out + (["", *d["notes"]] if d.get("notes") else [])


def pipeline_section() -> list[str]:
    d = _load("bench_classify.json")
    out = [f"Machine: {machine_line(d['machine'])}; {d['images']:,} PNG files.", "",
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
    return out


def gpu_section() -> list[str]:
    """benchmarks/gpu.sh's classify figures (results/gpu/): both providers on its PNGs, the variants, the scaling."""
    d = _gpu()
    out = [f"Machine: {machine_line(d['bench_classify_cuda.json']['machine'])}.", "",
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
    return out




def _gpu() -> dict:
    files = {p.name: (json.loads(p.read_text()) if p.suffix == ".json" else p.read_text())
             for p in sorted((RESULTS / "gpu").glob("*")) if p.suffix in (".json", ".log")}
    if "bench_classify_cuda.json" not in files:
        raise LookupError("benchmarks/results/gpu/bench_classify_cuda.json is missing")
    return files


def int8_section() -> list[str]:
    d = _load("int8_methods.json")
    out = [f"Machine: {machine_line(d['machine'])}; the fast recipe, seed 0; ties: test images whose two highest "
           "logits are equal; speed: CPU time of one call on one thread at batch 256, best of "
           f"{d['rounds']} rounds.", "",
           "| | test accuracy | vs PyTorch | top-1 agreement | exact ties | images/s per core, batch 256 |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in d["variants"].items():
        shown = f"**int8 {name} (default)**" if name == DEFAULT_INT8 else ("fp32" if name == "fp32" else f"int8 {name}")
        out.append(f"| {shown} | {v['test_accuracy_pct']:.2f}% | {v['accuracy_change_points']:+.2f} | "
                   f"{v['top1_agreement_pct']:.2f}% | {v['top1_ties']} | {v['cpu_images_per_s_per_core_256']:,.0f} |")
    return out


DEFAULT_INT8 = "static, per-channel weights, float logits"  # export --quantize int8's default (export.py)


def naive_section() -> list[str]:
    d = _load("classify.json")
    c, n = d["classify"], d["naive"]
    return [f"Machine: {machine_line(d['machine'])}; {d['images']:,} PNG files, {d['timing']}.", "",
            "| what | seconds | images/s |", "| --- | ---: | ---: |",
            f"| `fmnist-onnx classify` | {c['seconds']:.2f} | {c['images_per_s']:,.0f} |",
            f"| naive loop ({n['what']}) | {n['seconds']:.2f} | {n['images_per_s']:,.0f} |", "",
            f"classify is {d['ratio']:.2f}x the naive loop (wanted: {d['target_ratio']:.0f}x, "
            f"{'met' if d['meets_target'] else '**missed**'})."]


def ray_section() -> list[str]:
    """Every steady-state file of benchmarks/classify_ray.py: the engines' steady state and fixed cost."""
    out = ["| run | engine | steady state | vs local (wall; per CPU second) | fixed cost | measured on |",
           "| --- | --- | ---: | ---: | ---: | --- |"]
    for path in sorted(RESULTS.glob("classify_ray*_steady_state.json")):
        d = _load(path.name)
        run = path.name.removeprefix("classify_ray").removesuffix("_steady_state.json").strip("_") or "latest"
        where = f"{machine_line(d['machine'])}; ray {d['ray_version']}"
        for name, e in d["engines"].items():
            vs = d["steady_over_local"].get(name)
            ratio = f"{vs['best']:.2f}x; {vs['per_cpu_second']:.2f}x" if vs else "1x"
            out.append(f"| {run} | {name} | {e['steady_images_per_s']:,.0f} images/s | {ratio} | "
                       f"{e['fixed_s']:.1f} s | {where} |")
    return out


def headline_section() -> list[str]:
    t, i, c, g = _load("train.json"), _load("inference.json"), _load("classify.json"), _gpu()
    fast = t["summary"]["fast"]
    at = {(r["backend"], r["precision"]): r["images_per_s"] for r in i["results"] if r["batch_size"] == 256}
    cpu = g.get("classify_cpu.json", {})
    m = lambda d: (f"{d['machine']['cpu']}, {d['machine'].get('usable_cores', d['machine']['cores'])} cores, "  # noqa: E731
                   f"{d['machine']['measured_at'][:10]}")
    int8 = f", int8 {at[('onnxruntime', 'int8')]:,.0f}" if int8_is_current(i) else ""
    out = [f"- **Training** (fast recipe, 10 epochs, CPU): {fast['median_test_accuracy']:.2f}% test accuracy, "
           f"median of {len(fast['seeds'])} seeds, in {fast['median_wall_s']:.0f} s ({m(t)}).",
           f"- **Inference** at batch 256: onnxruntime fp32 {at[('onnxruntime', 'fp32')]:,.0f} images/s{int8}, "
           f"PyTorch eager {at[('torch', 'fp32')]:,.0f} ({m(i)}).",
           f"- **classify** of {c['images']:,} PNG files: {c['classify']['images_per_s']:,.0f} images/s, "
           f"{c['ratio']:.2f}x a naive Pillow loop ({m(c)})."]
    if cpu:
        gm = g["bench_classify_cuda.json"]["machine"]
        gpu = gm["gpus"][0].split(",")[0] if gm.get("gpus") else "GPU"
        out.append(f"- On one {gpu} machine with {gm['cores']} CPU cores: classify of "
                   f"{cpu['files']:,} PNG files at {cpu['images_per_s']:,.0f} images/s ({gm['measured_at'][:10]}).")
    return out


def setup_section() -> list[str]:
    d, t = _load("setup.json"), _load("train.json")
    v, j = d["venv"], d["job"]
    gb = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731 (du -sh's unit)
    parts = ", ".join(f"{k} {gb(b)}" for k, b in v["parts"].items())
    name = lambda c: "data export-png" if c.split()[1] == "data" else c.split()[1]  # noqa: E731
    steps = ", ".join(f"{name(s['command'])} {s['seconds']:.0f} s" for s in j["steps"])
    m, tm = d["machine"], t["machine"]
    where = lambda m: f"{m['cpu']} ({', '.join(m['cpu_flags'])}), {m.get('usable_cores', m['cores'])} cores"  # noqa: E731
    total = j["total_s"]
    took = f"{total:.0f} s" if total < 120 else f"{total / 60:.0f} minutes"
    busy = m["load_average"][0] >= 3 or j["load_average_after"][0] >= 3  # 2 cores: more than one other job's worth
    how = "shared with other work" if busy else "nothing else running"
    quieter = (f" On a quieter {where(tm)} (load average {tm['load_average'][0]}, {tm['measured_at'][:10]}) the same "
               f"training took {t['summary']['fast']['median_wall_s']:.0f} s." if busy else "")
    return [f"The test command's virtual environment (extras `[{v['extras']}]`: the first command's `[train,cpu,"
            f"parquet]`, plus the test tools and Ray) takes **{gb(v['total_bytes'])}** on disk: {parts}; the first "
            f"command's alone is smaller by the test tools and Ray, not measured here. The first command's "
            f"`fmnist-onnx` steps took **{took}** after the install ({steps}) on {where(m)}, {how} (load average "
            f"{m['load_average'][0]} at the start, {j['load_average_after'][0]} at the end; "
            f"{m['measured_at'][:10]}).{quieter} The install itself depends on the network."]


def plot_section(prefix: str = "") -> list[str]:
    d = _load("inference.json")
    m = d["machine"]
    stale = "" if int8_is_current(d) else " Its int8 curve is an earlier int8 model (per-tensor weights, uint8 logits)."
    alt = "Images/s by batch size: onnxruntime fp32 and int8, PyTorch eager"
    return [f"![{alt}]({prefix}benchmarks/results/inference.png)",
            "", f"*`python benchmarks/inference.py` on {m['cpu']}, {m.get('usable_cores', m['cores'])} cores, "
                f"{m['measured_at'][:10]}: images/s by batch size.{stale}*"]


def sources_section() -> list[str]:
    """benchmarks/classify_sources.py: the same train images as loose PNGs, tar shards, a Parquet file."""
    d = _load("classify_sources.json")
    best, steady, whole, r = d["best_s"], d["steady_images_per_s"], d["whole_images_per_s"], d["ratios"]
    n = d["images"]
    rows = [f"| PNG folder | {best[f'png_{n}']:.2f} | {whole['png']:,} | {steady['png']:,} |",
            f"| tar shards (WebDataset) | {best[f'tar_{n}']:.2f} | {whole['tar']:,} | {steady['tar']:,} |",
            f"| Parquet (Hugging Face) | {best[f'parquet_{n}']:.2f} | {whole['parquet']:,} | {steady['parquet']:,} |",
            f"| tar shards unpacked, then the folder | {best[f'unpack_tar_then_png_{n}']:.2f} | "
            f"{round(n / best[f'unpack_tar_then_png_{n}']):,} | |"]
    return [f"Machine: {machine_line(d['machine'])}; {n:,} train images, best of {d['repeats']}.", "",
            f"| {n:,} images as | seconds | images/s, whole process | images/s, steady state |",
            "| --- | ---: | ---: | ---: |", *rows, "",
            f"tar directly is {r['tar_over_unpack_then_folder']:.2f}x unpacking it and classifying the folder; in "
            f"the steady state tar is {r['tar_over_folder_steady']:.2f}x the folder and Parquet "
            f"{r['parquet_over_folder_steady']:.2f}x (whole process: {r['tar_over_folder_whole']:.2f}x and "
            f"{r['parquet_over_folder_whole']:.2f}x); labels identical across layouts: "
            f"{'yes' if d['identical_labels'] else '**no**'}.", *_median_line(d)]


def _median_line(d: dict) -> list[str]:
    """The second estimate of the steady state (the median of each repeat's own), where the results have it."""
    r, n = d["ratios"], d.get("unpack_repeats", d["repeats"])
    if "tar_over_folder_steady_median" not in r:
        return []
    return ["", f"The median of the {d['repeats']} repeats' own steady states gives tar "
                f"{r['tar_over_folder_steady_median']:.2f}x and Parquet {r['parquet_over_folder_steady_median']:.2f}x "
                f"the folder. The unpacked contender ran {'once' if n == 1 else f'{n} times'} (it writes 60,000 files "
                "to disk each time)."]


WRITER_NAMES = {"folder": "PNG folder (`data export-png`)", "tarfile_pax": "tar: Python's tarfile (pax)",
                "webdataset": "tar: WebDataset TarWriter", "gnutar_gnu": "tar: GNU tar --format=gnu",
                "gnutar_posix": "tar: GNU tar --format=posix", "bsdtar": "tar: bsdtar",
                "datasets_file": "Parquet: `datasets`, one file",
                "datasets_shards": "Parquet: `datasets`, a folder of shards"}


def writers_section() -> list[str]:
    """benchmarks/classify_writers.py: the train PNGs as shards written by each tool users have."""
    d = _load("classify_writers.json")
    med, first = d["median_s"], d["first_shard_runs_s"]
    steady, ratio = d["steady_images_per_s_median"], d["steady_over_folder_median"]
    whole = d["speed_over_folder_median"]
    rows = []
    for k in med:
        same = "" if k == "folder" else ("yes" if d["identical_rows"][k] else "**no**")
        x = ("1.00x", "1.00x") if k == "folder" else (f"{whole[k]:.2f}x", f"{ratio[k]:.2f}x")
        rows.append(f"| {WRITER_NAMES.get(k, k)} | {med[k]:.2f} | {statistics.median(first[k]):.2f} | "
                    f"{steady[k]:,} | {x[0]} | {x[1]} | {same} |")
    n, s = d["images"], d["shard_size"]
    return [f"Machine: {machine_line(d['machine'])}; {n:,} train images in shards of {s:,}, medians of "
            f"{d['repeats']} interleaved repeats.", "",
            f"| written by | {n:,} images, s | first {s:,}, s | images/s, steady state | whole process, x folder "
            "| steady state, x folder | rows as the folder's |", "| --- | ---: | ---: | ---: | ---: | ---: | :---: |",
            *rows]


SECTIONS = {"plot": plot_section, "plot_docs": lambda: plot_section("../"),
            "headline": headline_section, "setup": setup_section, "inference": inference_section,
            "train": train_section, "pipeline": pipeline_section, "naive": naive_section, "int8": int8_section,
            "ray": ray_section, "gpu": gpu_section, "sources": sources_section,
            "contention": contention_section, "writers": writers_section}


def render_page(text: str, name: str) -> tuple[str, list[str]]:
    """The page with every section rendered afresh, and the problems found (unknown sections, missing results)."""
    problems: list[str] = []

    def fill(m: re.Match) -> str:
        section = SECTIONS.get(m["name"])
        if section is None:
            problems.append(f"{name}: unknown figures section {m['name']!r}")
            return m.group(0)
        try:
            body = "\n".join(section()).rstrip() + "\n"
        except (LookupError, KeyError) as e:
            problems.append(f"{name}, section {m['name']}: {e}")
            return m.group(0)
        return f"{m.group(1)}{body}{m.group(4)}"

    return MARKERS.sub(fill, text), problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="change nothing; exit 1 where a page disagrees with results")
    mode.add_argument("--print", action="store_true", help="print every section instead of rewriting the pages")
    args = p.parse_args(argv)
    if args.print:
        for name, section in SECTIONS.items():
            print(f"<!-- figures: {name} -->\n" + "\n".join(section()) + f"\n<!-- /figures: {name} -->\n")
        return 0
    failed = False
    for page in pages():
        name = str(page.relative_to(ROOT))
        text = page.read_text()
        new, problems = render_page(text, name)
        for problem in problems:
            print(problem, file=sys.stderr)
        failed |= bool(problems)
        if new == text:
            continue
        if args.check:
            diff = difflib.unified_diff(text.splitlines(), new.splitlines(), f"{name} (page)", f"{name} (results)",
                                        n=0, lineterm="")
            print("\n".join(diff), file=sys.stderr)
            failed = True
        else:
            tmp = page.with_name(f".{page.name}.tmp{os.getpid()}")
            tmp.write_text(new)
            os.replace(tmp, page)
            print(f"rendered {name}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
