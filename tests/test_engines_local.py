"""engines/local.py: the two places the model runs (in the decoding workers, in a batched stage) give the same
rows, and every --provider choice list is the provider table's."""

from __future__ import annotations

import pytest

from conftest import run_cli
from fmnist_onnx.runtime import PROVIDER_CHOICES, PROVIDER_TABLE


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


def test_every_provider_choice_list_is_the_tables():
    import click

    from fmnist_onnx.cli import cli

    def options(cmd, path=()):
        for p in cmd.params:
            if isinstance(p, click.Option) and "--provider" in p.opts:
                yield (*path, cmd.name), p
        for sub in getattr(cmd, "commands", {}).values():
            yield from options(sub, (*path, cmd.name))

    found = list(options(cli))
    assert {"/".join(where[1:]) for where, _ in found} >= {"verify", "export", "classify", "bench", "bench/classify"}
    for where, opt in found:
        assert tuple(opt.type.choices) == PROVIDER_CHOICES, where
    assert PROVIDER_CHOICES == ("auto", *PROVIDER_TABLE)


def test_bench_classify_measures_the_coordinator_and_the_scaling(onnx_model, test_pngs, tmp_path):
    import json

    run_cli("bench", "classify", test_pngs / "Coat", "-m", onnx_model, "--provider", "cpu", "--workers", "2",
            "--scaling", "--json", tmp_path / "b.json", "--quiet", check=True)
    data = json.loads((tmp_path / "b.json").read_text())
    assert [r["processes"] for r in data["scaling"]] == [1, 2]
    assert all(r["images"] == 1000 and r["images_per_s"] > 0 for r in data["scaling"])
    c = data["coordinator"]
    assert c["files"] == 1000 and 0.01 < c["startup_cpu_s"] < 30 and c["cpu_us_per_file"] >= 0
