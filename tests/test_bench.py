"""`fmnist-onnx bench`: real sessions, real timings on short runs. No assertion on speed: speed lives in
benchmarks/. What is checked is the shape and the arithmetic of the figures, and the bad-input contract."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from fmnist_onnx import bench
from fmnist_onnx.spec import FLOPS_PER_IMAGE

SIZES = (1, 64)


@pytest.fixture(scope="module")
def short_run(onnx_model, weights, tmp_path_factory):
    """One short benchmark of onnxruntime fp32, int8 (quantized on the fly) and torch: (process, JSON, png)."""
    out = tmp_path_factory.mktemp("bench")
    proc = run_cli("bench", "--model", onnx_model, "--weights", weights, "--batch-sizes", ",".join(map(str, SIZES)),
                   "--provider", "cpu", "--duration", "0.2", "--json", out / "bench.json", "--plot", out / "bench.png",
                   check=True)
    return proc, json.loads((out / "bench.json").read_text()), out / "bench.png"


def test_json_schema(short_run):
    _, data, _ = short_run
    machine = data["machine"]
    for key in ("cpu", "cores", "memory_gib", "versions", "providers", "peak"):
        assert key in machine, key
    assert "onnxruntime" in machine["versions"] and "CPUExecutionProvider" in machine["providers"]
    assert machine["peak"]["cpu"]["gflops"] > 0
    for r in data["results"]:
        assert r["backend"] in ("onnxruntime", "torch")
        assert r["provider"] == "cpu"
        assert r["precision"] in ("fp32", "int8", "fp16")
        assert set(r["latency_ms"]) >= {"p50", "p90", "p99", "min", "max"}
        for key in ("images_per_s", "first_run_ms", "gflops"):
            assert isinstance(r[key], float) and r[key] > 0, key
    options = {(r["backend"], r["precision"]) for r in data["results"]}
    assert options == {("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("torch", "fp32")}
    for option in options:  # every option at every batch size, once
        assert sorted(r["batch_size"] for r in data["results"] if (r["backend"], r["precision"]) == option) == [*SIZES]


def test_percentiles_ordered(short_run):
    for r in short_run[1]["results"]:
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], r


def test_images_per_s_consistent_with_latencies(short_run):
    data = short_run[1]
    peak = data["machine"]["peak"]["cpu"]["gflops"]
    for r in data["results"]:
        lat = r["latency_ms"]
        assert r["images_per_s"] == pytest.approx(r["batch_size"] * 1000 / lat["mean"], rel=1e-9)
        assert r["batch_size"] * 1000 / lat["max"] <= r["images_per_s"] <= r["batch_size"] * 1000 / lat["min"]
        assert r["gflops"] == pytest.approx(r["images_per_s"] * FLOPS_PER_IMAGE / 1e9, rel=1e-9)
        assert r["roofline_pct"] == pytest.approx(100 * r["gflops"] / peak, rel=1e-9)
        assert r["runs"] >= bench.MIN_RUNS


def test_int8_quantized_on_the_fly_when_none_beside(short_run):
    proc, data, _ = short_run
    assert [r["batch_size"] for r in data["results"] if r["precision"] == "int8"] == [*SIZES]
    assert "quantized on the fly" in proc.stderr


def test_table_marks_the_fastest_per_batch_size(short_run):
    proc, data, _ = short_run
    starred = [line for line in proc.stdout.splitlines() if line[6:7] == "*"]
    assert sorted(int(line[:5]) for line in starred) == [*SIZES]
    for line in starred:
        bs = int(line[:5])
        best = max((r for r in data["results"] if r["batch_size"] == bs), key=lambda r: r["images_per_s"])
        label = f"{best['backend']} {best['provider']} {best['precision']}"
        assert line[7:].startswith(label), (line, label)


def test_plot_is_a_png(short_run):
    assert short_run[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_first_run_is_kept_out_of_the_timed_calls(onnx_model):
    """measure() calls the runner once (timed with session creation), then a fixed 2-call warm-up with
    warmup_s=0, then exactly `runs` timed calls: the first call is in none of the percentiles."""
    calls = []

    def make(batch):
        runner = bench._ort_candidate(onnx_model, "cpu", "fp32", None).make(batch)
        run = runner.run
        return bench.Runner(lambda: calls.append(run()))

    cand = bench.Candidate("onnxruntime", "cpu", "fp32", make)
    peak = bench.Peak("cpu", 100.0, "given", None)
    rec = bench.measure(cand, bench.make_input(8), 0.05, peak, warmup_s=0)
    assert len(calls) == 1 + 2 + rec.runs
    assert rec.first_run_ms > 0 and rec.runs >= bench.MIN_RUNS
    assert all(out[0].shape == (8, 10) for out in calls)  # real logits, every call


def test_latency_percentiles_from_known_times():
    lat = bench.latency_ms(np.array([0.001, 0.002, 0.003, 0.004]))
    assert (lat.min, lat.max, lat.mean) == pytest.approx((1.0, 4.0, 2.5))
    assert lat.p50 == pytest.approx(2.5)


def test_int8_beside_the_model_is_used(onnx_model, tmp_path):
    from fmnist_onnx.export import quantize_int8

    model = tmp_path / "model.onnx"
    shutil.copyfile(onnx_model, model)
    quantize_int8(model, bench.int8_beside(model))
    proc = run_cli("bench", "--model", model, "--batch-sizes", "8", "--duration", "0.05", "--provider", "cpu",
                   "--json", tmp_path / "b.json", check=True)
    assert "quantized on the fly" not in proc.stderr
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
    (["--provider", "tpu"], "unknown provider"),
])
def test_bad_options_are_one_line(onnx_model, args, contains):
    proc = run_cli("bench", "--model", onnx_model, "--duration", "0.05", *args)
    assert_one_line_error(proc, 2, contains)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_missing_model_is_one_line(tmp_path):
    assert_one_line_error(run_cli("bench", "--model", tmp_path / "nope.onnx"), 2, "not found")


@pytest.mark.skipif("CUDAExecutionProvider" in bench.available_providers(), reason="CUDA is present here")
def test_cuda_without_cuda_fails_loudly(onnx_model):
    assert_one_line_error(run_cli("bench", "--model", onnx_model, "--provider", "cuda"), 2, "CUDAExecutionProvider")


def test_matmul_peak_names_its_method():
    peak = bench.matmul_peak("cpu", threads=1, duration_s=0.1, sizes=(128, 256))
    assert peak.method in peak.by_method and peak.gflops == max(peak.by_method.values())
    if len(os.sched_getaffinity(0)) > 1:
        assert "numpy" not in peak.by_method  # numpy's BLAS cannot be held to 1 thread: it must not count
    assert peak.size in (128, 256)
    assert math.isfinite(peak.roofline_images_per_s) and peak.roofline_images_per_s > 0


# ---------------------------------------------------------------------------------------------- bench classify

@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """200 real test-split PNG files in the ImageFolder layout."""
    out = tmp_path_factory.mktemp("png") / "test"
    run_cli("data", "export-png", "--split", "test", "--out", out, "--limit", "200", "--quiet", check=True)
    return out


def test_bench_classify_times_the_pipeline_beside_decode_and_naive(png_folder, onnx_model, tmp_path):
    proc = run_cli("bench", "classify", png_folder, "--model", onnx_model, "--provider", "cpu", "--workers", "2",
                   "--json", tmp_path / "c.json", check=True)
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["images"] == 200 and data["provider"] == "cpu" and data["workers"] == 2
    whats = [r["what"] for r in data["results"]]
    assert [w.split(" (")[0] for w in whats] == ["classify pipeline", "decode alone", "decode alone", "naive loop"]
    for r in data["results"]:
        assert r["images"] == 200
        assert r["images_per_s"] == pytest.approx(200 / r["seconds"], rel=1e-9)
    pipe, decode, naive = data["results"][0], data["results"][1], data["results"][3]
    assert data["pipeline_pct_of_decode"] == pytest.approx(100 * pipe["images_per_s"] / decode["images_per_s"])
    assert data["pipeline_over_naive"] == pytest.approx(pipe["images_per_s"] / naive["images_per_s"])
    assert "naive loop" in proc.stdout and "decoding alone" in proc.stdout


def test_naive_loop_writes_a_row_per_image(png_folder, onnx_model, tmp_path):
    paths = sorted(str(p) for p in png_folder.rglob("*.png"))
    bench.naive_loop(paths, onnx_model, tmp_path / "naive.csv")
    lines = (tmp_path / "naive.csv").read_text().splitlines()
    assert lines[0] == "path,label" and len(lines) == 1 + len(paths)


def test_bench_classify_folder_without_images_is_one_line(onnx_model, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    assert_one_line_error(run_cli("bench", "classify", tmp_path, "--model", onnx_model), 2, "no image files")


def test_bench_classify_missing_folder_is_one_line(onnx_model, tmp_path):
    assert_one_line_error(run_cli("bench", "classify", tmp_path / "nope", "--model", onnx_model), 2, "not a folder")
