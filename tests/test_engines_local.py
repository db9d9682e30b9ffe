"""engines/local.py: the two places the model runs (in the decoding workers, in a batched stage) give the same
rows; a file that kills its worker costs that file alone."""

from __future__ import annotations

import json
import os

import pytest

from fmnist_onnx.classify.contract import CRASHED
from fmnist_onnx.table import read_rows
from fmnist_onnx.testing import DIE_ON_ENV
from harness import run_cli


@pytest.mark.parametrize("top_k", [1, 3])
def test_batched_stage_gives_the_workers_rows_byte_for_byte(top_k, onnx_model, test_pngs, tmp_path):
    """The CUDA path's code (a batched inference stage with IO binding), run with the CPU provider."""
    outputs = {}
    for inference in ("workers", "batched"):
        out = tmp_path / f"{inference}.csv"
        proc = run_cli("classify", test_pngs / "Shirt", test_pngs / "Bag", "-m", onnx_model, "-o", out, "--quiet",
                       "--provider", "cpu", "--inference", inference, "--top-k", top_k, "--json")
        assert proc.returncode == 0, proc.stderr
        assert ("batched inference stage" in proc.stdout) == (inference == "batched")
        outputs[inference] = out.read_bytes()
    assert outputs["batched"].count(b"\n") == 2001 and outputs["batched"] == outputs["workers"]


def test_three_inference_processes_keep_the_walk_order(onnx_model, test_pngs, tmp_path):
    """Chunks done by several inference processes, whichever finishes first, are written in walk order."""
    from fmnist_onnx.classify import classify

    runs = {}
    for inference, stages in (("workers", None), ("batched", 3)):
        out = tmp_path / f"{inference}.csv"
        s = classify([test_pngs / "Sandal", test_pngs / "Dress"], onnx_model, out, provider="cpu", workers=2,
                     inference=inference, stages=stages)
        assert s.classified == 2000
        runs[inference] = out.read_bytes()
    assert runs["batched"] == runs["workers"]


@pytest.mark.parametrize("inference", ["workers", "batched"])
def test_a_file_that_kills_its_worker_costs_that_file_alone(inference, onnx_model, test_pngs, tmp_path):
    """A real process death on one file (testing.crash_point: as a decoder crash would): its chunk is decoded
    again file by file, the culprit gets the CRASHED row, every other file its row, exit 3."""
    folder = tmp_path / "in" / "Bag"
    folder.mkdir(parents=True)
    for src in sorted((test_pngs / "Bag").glob("*.png"))[:200]:
        (folder / src.name).write_bytes(src.read_bytes())
    culprit = sorted(folder.glob("*.png"))[120]
    args = ["classify", folder.parent, "-m", onnx_model, "--json", "--inference", inference, "--provider", "cpu"]
    clean = run_cli(*args, "-o", tmp_path / "clean.csv")
    crashed = run_cli(*args, "-o", tmp_path / "crashed.csv", env={**os.environ, DIE_ON_ENV: "/" + culprit.name})
    assert clean.returncode == 0 and crashed.returncode == 3, crashed.stderr
    want = {r["path"]: r for r in read_rows(tmp_path / "clean.csv")}
    got = {r["path"]: r for r in read_rows(tmp_path / "crashed.csv")}
    assert got.pop(str(culprit))["error"] == CRASHED
    del want[str(culprit)]
    assert got == want
    assert json.loads(crashed.stdout)["failed"] == 1


@pytest.mark.parametrize(("inference", "processes"), [("workers", 2), ("batched", 3)])
def test_the_engine_starts_its_processes_at_with_and_stops_them_at_its_end(inference, processes, onnx_model,
                                                                           test_pngs):
    """Made, the engine has started nothing; ``with`` forks its processes (2 workers; and 1 inference process on
    the batched path), the block's end stops them all, even where an error ends it; close() again is nothing."""
    import multiprocessing

    from fmnist_onnx.classify.contract import Request
    from fmnist_onnx.classify.engines import open_engine

    paths = [str(p) for p in sorted((test_pngs / "Bag").glob("*.png"))[:100]]
    request = Request([str(test_pngs / "Bag")], str(onnx_model), "-", "csv", 1, None, "auto", True, False, False,
                      "cpu", None)
    before = set(multiprocessing.active_children())
    engine = open_engine("local", request, workers=2, inference=inference)
    assert set(multiprocessing.active_children()) == before
    with pytest.raises(RuntimeError, match="ends the block"), engine as eng:
        started = set(multiprocessing.active_children()) - before
        assert len(started) == processes and all(p.is_alive() for p in started)
        assert sum(len(rows) for rows in eng.rows(iter([paths]), "csv", lambda seconds, files: None)) == 100
        raise RuntimeError("an error ends the block")
    assert not any(p.is_alive() for p in started)
    engine.close()
    assert set(multiprocessing.active_children()) == before
