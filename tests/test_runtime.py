"""runtime.py: a model whose declared shapes need more memory than the machine has is refused before any work;
onnxruntime failing mid-run (out of memory) is one line, exit 5, with the rows so far kept (issue 17); sessions
sleep rather than spin, with a thread per core this process may use (issue 28)."""

from __future__ import annotations

import resource
import shutil
from pathlib import Path

import numpy as np
import pytest

from fmnist_onnx.classify import identity_path
from fmnist_onnx.journal import journal_path
from fmnist_onnx.runtime import (
    MODEL_FAILED,
    ORT_SPIN_ENV,
    SPIN_ENTRY,
    cgroup_cpu_limit,
    machine_memory,
    open_session,
    usable_cores,
)
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


def linear_model(path: Path) -> Path:
    """The smallest model of this project's signature: flatten, one matrix product."""
    from onnx import helper, numpy_helper

    return save_classifier(path, "linear", [helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
                                            helper.make_node("MatMul", ["flat", "weights"], ["logits"])],
                           [numpy_helper.from_array(np.array([-1, 784], np.int64), "flat_shape"),
                            numpy_helper.from_array(np.ones((784, 10), np.float32), "weights")])


@pytest.mark.parametrize("spin, env, expected", [(None, None, "0"), (True, None, "1"), (None, "1", "1"),
                                                 (False, "1", "0"), (None, "0", "0")])
def test_sessions_sleep_rather_than_spin_unless_asked(tmp_path, monkeypatch, spin, env, expected):
    """A spinning pool beside busy processes holds the core the working thread needs (issue 28): off unless
    the caller (bench's peak rows) or FMNIST_ONNX_ORT_SPIN=1 asks; one thread per core this process may use."""
    if env is None:
        monkeypatch.delenv(ORT_SPIN_ENV, raising=False)
    else:
        monkeypatch.setenv(ORT_SPIN_ENV, env)
    session = open_session(linear_model(tmp_path / "linear.onnx"), "cpu", spin=spin)
    opts = session.session.get_session_options()
    assert opts.get_session_config_entry(SPIN_ENTRY) == expected
    assert opts.intra_op_num_threads == usable_cores()
    assert session.run(np.ones((3, 1, 28, 28), np.float32)).tolist() == [[784.0] * 10] * 3


def _cgroup(root: Path, membership: str, files: dict[str, str]) -> Path:
    """A cgroup tree under ``root`` as the kernel shows it: /proc/self/cgroup's lines, each file's text."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "self-cgroup").write_text(membership)
    return root / "self-cgroup"


@pytest.mark.parametrize("membership, files, expected", [
    # cgroup v2, a container with --cpus 2 (docker writes cpu.max in the container's own cgroup)
    ("0::/\n", {"cpu.max": "200000 100000\n"}, 2.0),
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    # v2 on a host: the process's slice has no limit, the one above it 1.5 CPUs; the lowest on the way up counts
    ("0::/user.slice/job.scope\n", {"user.slice/cpu.max": "150000 100000\n",
                                     "user.slice/job.scope/cpu.max": "max 100000\n"}, 1.5),
    ("0::/a/b\n", {"a/cpu.max": "400000 100000\n", "a/b/cpu.max": "50000 100000\n"}, 0.5),
    # v1: quota and period in files of their own, under the cpu controller's mount; -1 is no limit
    ("4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n",
     {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
     3.0),
    ("3:cpu,cpuacct:/\n0::/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
     None),
    ("0::/\n", {}, None),  # no cpu controller mounted
    ("0::/\n", {"cpu.max": "garbage\n"}, None),
])
def test_cgroup_cpu_limit_reads_v1_and_v2(tmp_path, membership, files, expected):
    assert cgroup_cpu_limit(tmp_path, _cgroup(tmp_path, membership, files)) == expected
