"""runtime.py: a model whose declared shapes need more memory than the machine has is refused before any work;
onnxruntime failing mid-run (out of memory) is one line, exit 5, with the rows so far kept (issue 17)."""

from __future__ import annotations

import resource
import shutil
from pathlib import Path

import numpy as np
import pytest

from fmnist_onnx.classify import identity_path
from fmnist_onnx.journal import journal_path
from fmnist_onnx.runtime import MODEL_FAILED, machine_memory
from fmnist_onnx.table import JournalScan
from harness import assert_one_line_error, run_cli, save_classifier

HUGE = 2**40


def _declared(src: Path, dest: Path, input_batch: int | None, output_batch: int | None) -> Path:
    """``src`` with fixed batch dimensions declared on its input and/or output."""
    import onnx

    m = onnx.load(str(src))
    for values, batch in ((m.graph.input, input_batch), (m.graph.output, output_batch)):
        if batch is not None:
            dim = values[0].type.tensor_type.shape.dim[0]
            dim.ClearField("dim_param")
            dim.dim_value = batch
    onnx.save(m, str(dest))
    return dest


def alloc_model(path: Path, scale: float = float(2**44)) -> Path:
    """A valid [N,1,28,28] -> [N,10] model that also makes ``scale * max(pixel)`` floats at run time: an
    all-black batch costs nothing, any other batch terabytes (onnxruntime's allocation fails)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(784, 10)).astype(np.float32), "w")
    k = numpy_helper.from_array(np.array([scale], np.float32), "k")
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["mm"]),
             helper.make_node("ReduceMax", ["input"], ["m"], keepdims=0), helper.make_node("Mul", ["m", "k"], ["mk"]),
             helper.make_node("Cast", ["mk"], ["n"], to=TensorProto.INT64),
             helper.make_node("ConstantOfShape", ["n"], ["big"], value=zero),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
             helper.make_node("Add", ["mm", "s"], ["logits"])]
    return save_classifier(path, "alloc", nodes, [w, k])


def black_then_garments(folder: Path, test_pngs: Path, black: int = 70, garments: int = 5) -> Path:
    """``black`` all-black PNGs named first, then ``garments`` real ones: with one worker, the first chunk
    (64 files) is all black and the next holds garments."""
    from PIL import Image

    (folder / "in").mkdir(parents=True)
    for i in range(black):
        Image.new("L", (28, 28), 0).save(folder / "in" / f"a{i:03d}.png")
    for i, src in enumerate(sorted((test_pngs / "Bag").glob("*.png"))[:garments]):
        shutil.copy(src, folder / "in" / f"z{i:03d}.png")
    return folder / "in"


def limit_memory() -> None:
    """For the child process: an address-space limit, so that the model's terabyte allocation fails whatever
    the machine's overcommit policy (never touching pages the OOM killer would count)."""
    resource.setrlimit(resource.RLIMIT_AS, (32 << 30, 32 << 30))


@pytest.mark.parametrize(("input_batch", "output_batch", "name"), [(HUGE, HUGE, "'input'"), (None, HUGE, "'")])
def test_a_model_declaring_more_memory_than_the_machine_is_refused_first(input_batch, output_batch, name,
                                                                          onnx_model, test_pngs, tmp_path):
    model = _declared(onnx_model, tmp_path / "huge.onnx", input_batch, output_batch)
    out = tmp_path / "preds.csv"
    proc = run_cli("classify", test_pngs / "Bag", "-m", model, "-o", out, "--workers", "1")
    assert_one_line_error(proc, 2, f"[{HUGE}, ")
    assert name in proc.stderr and "bytes" in proc.stderr and f"{machine_memory():,}" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.onnx"]  # no journal, no record, no lock left


def test_onnxruntime_out_of_memory_mid_run_is_one_line_and_keeps_the_rows(test_pngs, tmp_path):
    folder = black_then_garments(tmp_path, test_pngs)
    model = alloc_model(tmp_path / "alloc.onnx")
    out = tmp_path / "preds.csv"
    proc = run_cli("classify", folder, "-m", model, "-o", out, "--workers", "1", "--provider", "cpu", "-q",
                   preexec_fn=limit_memory)
    assert_one_line_error(proc, MODEL_FAILED, "could not allocate")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "64 rows so far are kept" in proc.stderr and "--resume" in proc.stderr
    scan = JournalScan(journal_path(out), "csv")
    assert len(list(scan)) == 64 and identity_path(out).exists() and not out.exists()


def test_classify_auto_takes_the_cpu_where_cuda_is_measured_slower():
    """The static rule (runtime.CLASSIFY_AUTO_DEVICE): CUDA present is not enough while classify measured it
    slower; no GPU provider at all is the CPU too, for another reason."""
    from fmnist_onnx.runtime import CLASSIFY_AUTO_DEVICE, classify_provider

    with_cuda = classify_provider("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert with_cuda[0] == ("cuda" if CLASSIFY_AUTO_DEVICE else "cpu")
    assert "CUDAExecutionProvider is available" in with_cuda[1] and "images/s" in with_cuda[1]
    assert classify_provider("auto", ["CPUExecutionProvider"]) == ("cpu", "auto: onnxruntime here has no GPU provider")
