"""engines/local.py: the two places the model runs (in the decoding workers, in a batched stage) give the same
rows."""

from __future__ import annotations

import pytest

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
