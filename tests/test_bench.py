"""`fmnist-onnx bench` and `bench classify`: real sessions, real timings on short runs. No assertion on speed:
speed lives in benchmarks/. What is checked: the timing harness against a clock the test controls, the shape of
the records, which peak each percentage refers to, and the bad-input contract."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fmnist_onnx import bench, bench_pipeline, timing
from fmnist_onnx.images import MAX_FILE_BYTES
from fmnist_onnx.peak import Peak
from fmnist_onnx.spec import FLOPS_PER_IMAGE
from harness import FakeClock, assert_one_line_error, run_cli

SIZES = (1, 64)


@pytest.fixture(scope="module")
def short_run(onnx_model, weights, tmp_path_factory):
    """One short benchmark of onnxruntime fp32, int8 (quantized on the fly) and torch: (process, JSON, png)."""
    out = tmp_path_factory.mktemp("bench")
    proc = run_cli("bench", "--model", onnx_model, "--weights", weights, "--batch-sizes", ",".join(map(str, SIZES)),
                   "--provider", "cpu", "--duration", "0.2", "--json", out / "bench.json", "--plot", out / "bench.png",
                   check=True)
    return proc, json.loads((out / "bench.json").read_text()), out / "bench.png"


def proc_lines(short_run) -> list[str]:
    return short_run[0].stdout.splitlines()


def test_json_schema(short_run):
    _, data, _ = short_run
    machine = data["machine"]
    for key in ("cpu", "cores", "memory_gib", "versions", "providers", "peak", "peak_int8", "busy"):
        assert key in machine, key
    assert set(machine["busy"]) == {"other_cpu_pct", "other_cores", "steal_pct", "cores", "seconds", "busy"}
    assert machine["busy"]["cores"] == machine["usable_cores"] and 0 <= machine["busy"]["other_cpu_pct"] <= 100
    assert (bench.busy_line(machine["busy"]) in proc_lines(short_run)) == machine["busy"]["busy"]
    assert "onnxruntime" in machine["versions"] and "CPUExecutionProvider" in machine["providers"]
    assert machine["peak"]["cpu"]["precision"] == "fp32" and machine["peak_int8"]["cpu"]["precision"] == "int8"
    for r in data["results"]:
        assert r["backend"] in ("onnxruntime", "torch")
        assert r["provider"] == "cpu"
        assert r["precision"] in ("fp32", "int8", "fp16")
        assert set(r["latency_ms"]) >= {"p50", "p90", "p99", "min", "max"}
        for key in ("images_per_s", "first_run_ms", "gflops", "roofline_pct"):
            assert isinstance(r[key], float) and r[key] > 0, key
        assert r["runs"] >= timing.MIN_RUNS
    options = {(r["backend"], r["precision"]) for r in data["results"]}
    assert options == {("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("torch", "fp32")}
    for option in options:  # every option at every batch size, once
        assert sorted(r["batch_size"] for r in data["results"] if (r["backend"], r["precision"]) == option) == [*SIZES]


def test_each_precision_is_set_against_its_own_peak(short_run):
    """int8 rows used to show 144-232% "of the roofline": the fp32 peak. Now int8 has an int8 peak
    (MatMulInteger), and the table says which peak each percentage refers to."""
    proc, data, _ = short_run
    peaks = {"fp32": data["machine"]["peak"]["cpu"], "int8": data["machine"]["peak_int8"]["cpu"]}
    assert peaks["int8"]["method"] in peaks["int8"]["by_method"] and "onnxruntime" in peaks["int8"]["by_method"]
    for r in data["results"]:
        assert r["roofline_pct"] == pytest.approx(100 * r["gflops"] / peaks[r["precision"]]["gflops"]), r
    assert "cpu int8 matmul peak" in proc.stdout and "GOP/s" in proc.stdout
    # torch._int_mm (seconds a call without VNNI) only with --torch-int8-peak, and the peak line says so
    assert set(peaks["int8"]["by_method"]) == {"onnxruntime"} and "--torch-int8-peak" in proc.stdout
    assert "in the row's own precision" in proc.stdout


UNIT = 1 / 1024  # durations in multiples of 2**-10 s add up exactly in binary floating point


def test_harness_reports_exactly_what_the_clock_measured():
    """Session creation 0.5 s and a first call of 0.25 s, two warm-up calls of 1 s, then calls of 1, 2, 3, 2
    units until 64 units have passed: the record must hold exactly those figures, warm-up and first run left out."""
    clock = FakeClock()
    durations = iter([0.25, 1.0, 1.0] + [k * UNIT for k in (1, 2, 3, 2)] * 100)

    def make(batch):
        clock.advance(0.5)
        return bench.Runner(lambda: clock.advance(next(durations)))

    # A peak at which 4096 images/s is half the roofline.
    peak = Peak("cpu", "fp32", 2 * 4096 * FLOPS_PER_IMAGE / 1e9, "given", None)
    cand = bench.Candidate("onnxruntime", "cpu", "fp32", make)
    rec = bench.measure(cand, bench.make_input(8), duration_s=64 * UNIT, peak=peak, warmup_s=0, clock=clock)
    assert rec.first_run_ms == 750.0
    assert rec.runs == 32  # 8 rounds of (1, 2, 3, 2) units fill the 64 units
    ms = 1e3 * UNIT
    lat = rec.latency_ms
    assert (lat.min, lat.p50, lat.mean, lat.p90, lat.max) == (1 * ms, 2 * ms, 2 * ms, 3 * ms, 3 * ms)
    assert rec.images_per_s == 4096.0  # 8 images every 2 units (1/512 s) on average
    assert rec.roofline_pct == pytest.approx(50.0)
    assert rec.gflops == pytest.approx(4096 * FLOPS_PER_IMAGE / 1e9)


def test_table_shows_no_percentage_without_a_peak_of_that_precision():
    lat = timing.LatencyMs(1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    fp16 = bench.BenchRecord("onnxruntime", "cuda", "fp16", 8, 8000.0, lat, 5.0, 10.7, None, 10)
    fp32 = bench.BenchRecord("onnxruntime", "cuda", "fp32", 8, 4000.0, lat, 5.0, 5.4, 12.5, 10)
    report = bench.BenchReport({}, {}, {("cuda", "fp32"): Peak("cuda", "fp32", 43.0, "onnxruntime", None)},
                               [fp32, fp16])
    rows = {line.split()[3]: line for line in bench.format_table(report).splitlines() if line[:5] == "    8"}
    assert rows["fp16"].rstrip().endswith(" -") and rows["fp32"].rstrip().endswith("12%")
    assert set(report.to_json()["machine"]) == {"peak"}  # no fp16 peak was measured, none is written


def test_table_marks_the_fastest_per_batch_size(short_run):
    proc, data, _ = short_run
    starred = [line for line in proc.stdout.splitlines() if line[6:7] == "*"]
    assert sorted(int(line[:5]) for line in starred) == [*SIZES]
    for line in starred:
        bs = int(line[:5])
        best = max((r for r in data["results"] if r["batch_size"] == bs), key=lambda r: r["images_per_s"])
        label = f"{best['backend']} {best['provider']} {best['precision']}"
        assert line[7:].startswith(label), (line, label)


def test_progress_says_what_is_measured_as_it_goes(short_run):
    """The announcement first, then a line as each step starts (the peaks, each option) before its rows."""
    lines = short_run[0].stderr.splitlines()
    assert lines[0].startswith("bench ") and "batch sizes 1, 64" in lines[0], lines
    at = {line: i for i, line in enumerate(lines)}
    first_row = min(i for i, line in enumerate(lines) if line.startswith("  onnxruntime cpu fp32 batch"))
    assert at["measuring the cpu fp32 matrix-product peak"] < at["measuring the cpu int8 matrix-product peak"] \
        < at["measuring onnxruntime cpu fp32 at batch 1, 64"] < first_row
    for option in ("onnxruntime cpu int8", "torch cpu fp32"):
        row = next(i for i, line in enumerate(lines) if line.startswith(f"  {option} batch 1:"))
        assert at[f"measuring {option} at batch 1, 64"] < row
    assert at["quantizing model.onnx to int8 (no model.int8.onnx beside it)"] < first_row


def test_first_line_comes_before_onnxruntime_is_imported(onnx_model):
    """Progress at once: the announcement is written before the heavy imports (here onnxruntime cannot be
    imported at all, and the line is there before its error)."""
    code = ("import sys; sys.modules['onnxruntime'] = None; from fmnist_onnx.cli import main; "
            "sys.argv = ['fmnist-onnx'] + sys.argv[1:]; main()")
    proc = subprocess.run([sys.executable, "-c", code, "bench", "--model", str(onnx_model), "--no-torch"],
                          capture_output=True, text=True)
    assert_one_line_error(proc, 2, "onnxruntime is not installed")
    assert proc.stderr.splitlines()[0].startswith(f"bench {onnx_model}: batch sizes 1, 64, 1024, 1 s each")


@pytest.mark.parametrize("args, sizes, peak_sizes", [
    ([], [1, 64, 1024], [512, 1024]),
    (["--full"], [1, 8, 64, 256, 1024], [512, 1024, 2048]),
])
def test_default_is_short_and_full_is_the_sweep(onnx_model, weights, tmp_path, args, sizes, peak_sizes):
    """The default batch sizes and peak sizes, and --full's; --no-int8 and --no-torch leave out those options
    (a model.pth beside the model included) and the peaks that only they need (no torch in the fp32 peak)."""
    shutil.copyfile(onnx_model, tmp_path / "model.onnx")
    shutil.copyfile(weights, tmp_path / "model.pth")
    run_cli("bench", "-m", tmp_path / "model.onnx", *args, "--duration", "0.05", "--no-int8", "--no-torch",
            "--provider", "cpu", "--json", tmp_path / "b.json", "-q", check=True)
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["settings"]["batch_sizes"] == sizes and data["settings"]["peak_sizes"] == peak_sizes
    assert [(r["backend"], r["precision"], r["batch_size"]) for r in data["results"]] == [
        ("onnxruntime", "fp32", bs) for bs in sizes]
    assert "peak_int8" not in data["machine"] and "torch" not in data["machine"]["peak"]["cpu"]["by_method"]
    assert data["machine"]["peak"]["cpu"]["size"] in peak_sizes


def test_int8_quantized_on_the_fly_when_none_beside(short_run):
    proc, data, _ = short_run
    assert [r["batch_size"] for r in data["results"] if r["precision"] == "int8"] == [*SIZES]
    assert "quantized on the fly" in proc.stderr


def test_first_run_is_kept_out_of_the_timed_calls(onnx_model):
    """measure() calls the runner once (timed with session creation), then a fixed 2-call warm-up with
    warmup_s=0, then exactly `runs` timed calls: the first call is in none of the percentiles."""
    calls = []

    def make(batch):
        runner = bench._ort_candidate(onnx_model, "cpu", "fp32", None).make(batch)
        run = runner.run
        return bench.Runner(lambda: calls.append(run()))

    cand = bench.Candidate("onnxruntime", "cpu", "fp32", make)
    peak = Peak("cpu", "fp32", 100.0, "given", None)
    rec = bench.measure(cand, bench.make_input(8), 0.05, peak, warmup_s=0)
    assert len(calls) == 1 + 2 + rec.runs
    assert rec.first_run_ms > 0 and rec.runs >= timing.MIN_RUNS
    assert all(out[0].shape == (8, 10) for out in calls)  # real logits, every call


def test_int8_beside_the_model_is_used(onnx_model, tmp_path):
    from fmnist_onnx.export import quantize_int8

    model = tmp_path / "model.onnx"
    shutil.copyfile(onnx_model, model)
    quantize_int8(model, bench.int8_beside(model))
    proc = run_cli("bench", "--model", model, "--batch-sizes", "8", "--duration", "0.05", "--provider", "cpu",
                   "--json", tmp_path / "b.json", "--quiet", check=True)
    assert "quantized on the fly" not in proc.stderr
    assert "measuring" not in proc.stderr and "images/s" not in proc.stderr  # --quiet: no progress
    assert any(r["precision"] == "int8" for r in json.loads((tmp_path / "b.json").read_text())["results"])


def test_runs_without_torch(onnx_model, weights, tmp_path):
    """The onnxruntime benchmark needs no torch: with torch unimportable, it runs and says torch was skipped."""
    code = ("import sys; sys.modules['torch'] = None; from fmnist_onnx.cli import main; "
            "sys.argv = ['fmnist-onnx'] + sys.argv[1:]; main()")
    proc = subprocess.run([sys.executable, "-c", code, "bench", "--model", str(onnx_model), "--weights", str(weights),
                           "--batch-sizes", "4", "--duration", "0.05", "--provider", "cpu",
                           "--json", str(tmp_path / "b.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "torch is not installed" in proc.stderr
    assert "quantized on the fly (dynamic int8)" in proc.stderr  # static calibration reads data through torch
    data = json.loads((tmp_path / "b.json").read_text())
    assert {r["backend"] for r in data["results"]} == {"onnxruntime"}
    assert "torch" not in data["machine"]["peak"]["cpu"]["by_method"]
    assert set(data["machine"]["peak_int8"]["cpu"]["by_method"]) == {"onnxruntime"}


def _wrong_signature_model(path):
    """A real, valid ONNX model that takes 3-channel images: loadable, but not this classifier."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((3 * 28 * 28, 10), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "wrong", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_wrong_signature_is_one_line(tmp_path):
    model = _wrong_signature_model(tmp_path / "wrong.onnx")
    assert_one_line_error(run_cli("bench", "--model", model, "--duration", "0.05"), 2, "not a Fashion-MNIST")


@pytest.mark.parametrize("args, contains", [
    (["--batch-sizes", "1,0,8"], "--batch-sizes"),
    (["--batch-sizes", "x"], "--batch-sizes"),
])
def test_bad_options_are_one_line(onnx_model, args, contains):
    proc = run_cli("bench", "--model", onnx_model, "--duration", "0.05", *args)
    assert_one_line_error(proc, 2, contains)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_unknown_provider_is_a_usage_error(onnx_model):
    """Click's own usage error (usage, hint, the error line): the choices are the provider table's."""
    proc = run_cli("bench", "--model", onnx_model, "--provider", "tpu")
    assert_one_line_error(proc, 2, "'tpu' is not one of 'auto', 'cpu', 'cuda'")


def test_missing_model_is_one_line(tmp_path):
    assert_one_line_error(run_cli("bench", "--model", tmp_path / "nope.onnx"), 2, "not found")


@pytest.mark.skipif("CUDAExecutionProvider" in bench.available_providers(), reason="CUDA is present here")
def test_cuda_without_cuda_fails_loudly(onnx_model):
    assert_one_line_error(run_cli("bench", "--model", onnx_model, "--provider", "cuda"), 2, "CUDAExecutionProvider")


# ---------------------------------------------------------------------------------------------- bench classify

@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """200 real test-split PNG files in the ImageFolder layout."""
    out = tmp_path_factory.mktemp("png") / "test"
    run_cli("data", "export-png", "--split", "test", "--out", out, "--limit", "200", "--quiet", check=True)
    return out


def test_bench_classify_cli_runs_each_contender_and_writes_json(png_folder, onnx_model, tmp_path):
    proc = run_cli("bench", "classify", png_folder, "--model", onnx_model, "--provider", "cpu", "--workers", "2",
                   "--json", tmp_path / "c.json", check=True)
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["images"] == 200 and data["provider"] == "cpu" and data["workers"] == 2
    whats = [r["what"] for r in data["results"]]
    assert [w.split(" (")[0] for w in whats] == ["classify pipeline", "decode alone", "decode alone", "naive loop"]
    assert [r["processes"] for r in data["results"]] == [2, 2, 1, 1]
    assert all(r["images"] == 200 and r["seconds"] > 0 for r in data["results"])
    for what in whats:
        assert what in proc.stdout
    assert "decoding alone" in proc.stdout and "the naive loop" in proc.stdout


class ScriptedClock:
    """A clock that reads out the given times, one per call, and fails if read once more."""

    def __init__(self, *times: float) -> None:
        self.times = iter(times)

    def __call__(self) -> float:
        return next(self.times)


def test_bench_classify_reports_the_best_run_the_clock_measured(png_folder, onnx_model):
    """Real runs of the four contenders, twice each, timed by a clock the test controls: (start, end) of each
    run below. The best run of each must give the figures, and the clock must be read around runs only."""
    clock = ScriptedClock(0, 3, 10, 12,  # pipeline: 3 s, then 2 s
                          20, 21, 30, 31.5,  # decode alone, 2 processes: 1 s, then 1.5 s
                          40, 44, 50, 55,  # decode alone, 1 process: 4 s, then 5 s
                          60, 68, 70, 80)  # naive loop: 8 s, then 10 s
    result = bench_pipeline.bench_classify(png_folder, onnx_model, workers=2, provider="cpu", repeats=2, clock=clock)
    assert next(clock.times, None) is None  # every reading used, none more
    assert [r["seconds"] for r in result["results"]] == [2, 1, 4, 8]
    assert [r["images_per_s"] for r in result["results"]] == [100, 200, 50, 25]  # 200 images
    assert result["pipeline_pct_of_decode"] == 50 and result["pipeline_over_naive"] == 4
    text = bench_pipeline.format_classify(result)
    assert "runs at 50% of decoding alone" in text and "4.0x the naive loop" in text


def test_naive_loop_writes_a_row_per_image(png_folder, onnx_model, tmp_path):
    paths = sorted(str(p) for p in png_folder.rglob("*.png"))
    bench_pipeline.naive_loop(paths, onnx_model, tmp_path / "naive.csv")
    lines = (tmp_path / "naive.csv").read_text().splitlines()
    assert lines[0] == "path,label" and len(lines) == 1 + len(paths)


def test_bench_classify_folder_without_images_is_one_line(onnx_model, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    assert_one_line_error(run_cli("bench", "classify", tmp_path, "--model", onnx_model), 2, "no image files")


def test_bench_classify_missing_folder_is_one_line(onnx_model, tmp_path):
    assert_one_line_error(run_cli("bench", "classify", tmp_path / "nope", "--model", onnx_model), 2,
                          "no such file or folder")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """300 real test-split images as two WebDataset tar shards (a .png and a .cls each), by `data export-png`."""
    out = tmp_path_factory.mktemp("shards")
    run_cli("data", "export-png", "--format", "tar", "--shard-size", "150", "--out", out, "--limit", "300",
            "--quiet", check=True)
    return sorted(out.glob("*.tar"))


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory):
    """300 real test-split images as a Hugging Face Parquet file (image {bytes, path}, label)."""
    out = tmp_path_factory.mktemp("hf")
    run_cli("data", "export-png", "--format", "parquet", "--out", out, "--limit", "300", "--quiet", check=True)
    return next(out.glob("*.parquet"))


@pytest.mark.parametrize("layout", ["tar", "parquet", "folder of shards"])
def test_bench_classify_measures_tar_shards_and_parquet(layout, shards, parquet_file, onnx_model, tmp_path):
    inputs = {"tar": shards, "parquet": [parquet_file], "folder of shards": [shards[0].parent]}[layout]
    layout = "parquet" if layout == "parquet" else "tar"  # a folder of shards: measured as its shards
    proc = run_cli("bench", "classify", *inputs, "-m", onnx_model, "--provider", "cpu", "--workers", "2",
                   "--json", tmp_path / "c.json", "--quiet", check=True)
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["sources"] == [layout] and data["images"] == 300
    assert [r["what"].split(" (")[0] for r in data["results"]] == ["classify pipeline", "decode alone",
                                                                    "decode alone", "naive loop"]
    assert all(r["images"] == 300 and r["images_per_s"] > 0 and r["sources"] == layout for r in data["results"])
    assert data["coordinator"]["files"] == 300 and data["coordinator"]["cpu_us_per_file"] >= 0
    assert f"300 images from {inputs[0]}" in proc.stdout and f"({layout}; provider cpu" in proc.stdout


def test_naive_loop_reads_tar_and_parquet_the_plain_way(shards, parquet_file, onnx_model, tmp_path):
    """tarfile and pyarrow rows: a row per image (the .cls sidecars are not images), named as classify names it."""
    images = bench_pipeline.plain_images([], [("tar", str(t)) for t in shards] + [("parquet", str(parquet_file))])
    bench_pipeline.naive_loop(images, onnx_model, tmp_path / "naive.csv")
    rows = (tmp_path / "naive.csv").read_text().splitlines()[1:]
    assert len(rows) == 600
    assert rows[0].startswith(f"{shards[0]}::00000.png,") and rows[300].startswith(f"{parquet_file}::row/0,")


def test_bench_classify_says_why_the_coordinator_is_not_measured(parquet_file, onnx_model, tmp_path):
    """A first image with no bytes: the coordinator's one-image run cannot be made; one line says so."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(parquet_file)
    at = table.schema.get_field_index("image")
    images = table.column("image").to_pylist()
    table = table.set_column(at, table.schema.field(at), pa.array([None, *images[1:]], table.schema.field(at).type))
    pq.write_table(table, tmp_path / "null.parquet")
    proc = run_cli("bench", "classify", tmp_path / "null.parquet", "-m", onnx_model, "--provider", "cpu",
                   "--workers", "2", "--quiet", check=True)
    assert "coordinator (the process that walks and writes): not measured on these inputs: its first parquet " \
           "image cannot be read" in proc.stdout


def test_bench_classify_bad_container_is_one_line(onnx_model, tmp_path):
    (tmp_path / "x.parquet").write_text("not a table")
    assert_one_line_error(run_cli("bench", "classify", tmp_path / "x.parquet", "--model", onnx_model), 2,
                          "not a readable Parquet file")
    assert_one_line_error(run_cli("bench", "classify", tmp_path / "nope.tar", "--model", onnx_model), 2,
                          "cannot open the tar archive")


def test_bench_classify_measures_the_coordinator_and_the_scaling(onnx_model, test_pngs, tmp_path):
    run_cli("bench", "classify", test_pngs / "Coat", "-m", onnx_model, "--provider", "cpu", "--workers", "2",
            "--scaling", "--json", tmp_path / "b.json", "--quiet", check=True)
    data = json.loads((tmp_path / "b.json").read_text())
    assert [r["processes"] for r in data["scaling"]] == [1, 2]
    assert all(r["images"] == 1000 and r["images_per_s"] > 0 for r in data["scaling"])
    c = data["coordinator"]
    assert c["files"] == 1000 and 0.01 < c["startup_cpu_s"] < 30 and c["cpu_us_per_file"] >= 0


# ---------------------------------------------------------------------------------------------- hostile inputs

class Zeros(io.RawIOBase):
    """``n`` zero bytes, read as a file (a member's data that never sits in memory whole)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def _write_tar(path: Path, pngs: list[Path], mode: str = "w", big_after: int | None = None) -> Path:
    """The PNGs as a tar (Python's tarfile, ``mode`` its compression); ``big_after``: a member of
    MAX_FILE_BYTES + 1 zero bytes, named big.png, after that many of them."""
    with tarfile.open(path, mode, **({"compresslevel": 1} if mode != "w" else {})) as tf:
        for i, p in enumerate(pngs):
            if i == big_after:
                info = tarfile.TarInfo("big.png")
                info.size = MAX_FILE_BYTES + 1
                tf.addfile(info, Zeros(info.size))
            tf.add(p, arcname=p.name)
    return path


@pytest.fixture(scope="module")
def hostile(png_folder, tmp_path_factory) -> dict[str, Path]:
    """Archives classify reads (with error rows), each written by a real tool and then damaged, by what is
    wrong: a tar cut inside a member, a .tar.gz cut short (GNU tar), a zip with an encrypted member (Info-ZIP's
    zip -P), a .tar.gz with a member over the byte limit between images."""
    out = tmp_path_factory.mktemp("hostile")
    pngs = sorted(png_folder.rglob("*.png"))[:40]
    cut = _write_tar(out / "whole.tar", pngs)
    (out / "cut.tar").write_bytes(cut.read_bytes()[:20 * 1024 + 100])  # inside a member's data
    subprocess.run(["tar", "-czf", out / "whole.tar.gz", "-C", png_folder, "."], check=True)
    whole = (out / "whole.tar.gz").read_bytes()
    (out / "cut.tar.gz").write_bytes(whole[:len(whole) // 2])
    files = {"a tar cut inside a member": out / "cut.tar", "a .tar.gz cut short": out / "cut.tar.gz",
             "a .tar.gz with a member over the limit": _write_tar(out / "big.tar.gz", pngs[:10], "w:gz", 5)}
    if shutil.which("zip"):
        subprocess.run(["zip", "-q", "-j", out / "enc.zip", *pngs[:20]], check=True)
        subprocess.run(["zip", "-q", "-j", "-P", "secret", out / "enc.zip", *pngs[20:22]], check=True)
        files["a zip with an encrypted member"] = out / "enc.zip"
    return files


HOSTILE = ["a tar cut inside a member", "a .tar.gz cut short", "a zip with an encrypted member",
           "a .tar.gz with a member over the limit"]


@pytest.mark.parametrize("case", HOSTILE)
def test_bench_classify_reads_what_classify_reads_without_a_traceback(case, hostile, onnx_model, tmp_path):
    """Before: tracebacks from tarfile and zipfile in the naive loop, and 'Aborted!' (exit 1) for the cut
    .tar.gz (an EOFError taken by click for Ctrl-D). Classify gives the damage error rows; every contender
    runs."""
    if case not in hostile:
        pytest.skip("Info-ZIP's zip is not installed")
    proc = run_cli("bench", "classify", hostile[case], "-m", onnx_model, "--provider", "cpu", "--workers", "2",
                   "--json", tmp_path / "b.json", "--quiet")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "Aborted" not in proc.stderr, proc.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    assert [r["what"].split(" (")[0] for r in data["results"]] == ["classify pipeline", "decode alone",
                                                                    "decode alone", "naive loop"]


@pytest.mark.parametrize("case", HOSTILE)
def test_the_naive_loop_reads_hostile_archives_bounded(case, hostile):
    """tarfile and zipfile as a user's script uses them, but bounded as classify is: the images before the
    damage, the readable members, and never the member over the limit in memory (before: a .tar.bz2 of 1 GiB
    of zeros took 1.4 GB), without an exception."""
    import tracemalloc

    if case not in hostile:
        pytest.skip("Info-ZIP's zip is not installed")
    path = str(hostile[case])
    kind = "zip" if path.endswith(".zip") else "tar"
    tracemalloc.start()
    try:
        names = [name.rpartition("::")[2] for name, _ in bench_pipeline.plain_images([], [(kind, path)])]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if case.startswith("a tar cut") or case.startswith("a .tar.gz cut"):  # a first part of the whole's images
        whole = hostile[case].with_name(hostile[case].name.replace("cut", "whole"))
        with tarfile.open(whole) as tf:
            every = [m.name for m in tf if m.name.endswith(".png")]
        assert 0 < len(names) < len(every) and names == every[:len(names)], names
    else:  # the readable members; none after the big member (classify stops there too)
        assert len(names) == (20 if kind == "zip" else 5), names
    assert peak < 16 << 20, peak


def test_bench_classify_takes_the_image_column(parquet_file, onnx_model, tmp_path):
    """A table with two binary columns: without --image-column, classify's one line; with it, every contender
    (the coordinator's runs too) reads that column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [r["bytes"] for r in pq.read_table(parquet_file).column("image").to_pylist()[:50]]
    pq.write_table(pa.table({"photo": images, "thumb": [b"not an image"] * 50}), tmp_path / "two.parquet")
    args = ("bench", "classify", tmp_path / "two.parquet", "-m", onnx_model, "--provider", "cpu", "--workers", "2")
    assert_one_line_error(run_cli(*args), 2, "--image-column")
    run_cli(*args, "--image-column", "photo", "--json", tmp_path / "b.json", "--quiet", check=True)
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["images"] == 50 and data["coordinator"]["files"] == 50
    assert all(r["images"] == 50 for r in data["results"])
    assert_one_line_error(run_cli(*args, "--image-column", "nope"), 2, "no column 'nope'")
    assert_one_line_error(run_cli("bench", "classify", tmp_path, "-m", onnx_model, "--image-column", "photo"), 2,
                          "--image-column is for Parquet inputs")
