"""Training: recipes, determinism, checkpoints, resume after a real interrupt, devices."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pytest
import torch

from fmnist_onnx.testing import TRAIN_AFTER_STEP
from fmnist_onnx.train import _Batches, lr_at, make_config, train
from harness import Held, assert_one_line_error, cli_run, run_cli

# Where the size of the training set is not what a test checks, it trains on the first LIMIT images (--limit):
# 10 steps of the fast recipe an epoch instead of 118, the test split still evaluated whole.
LIMIT = 5120


def test_short_run_learns(trained_dir):
    metrics = json.loads((trained_dir / "metrics.json").read_text())
    assert metrics["epochs"][0]["test_accuracy"] > 80  # chance is 10%
    assert metrics["test_accuracy"] >= metrics["epochs"][0]["test_accuracy"] - 1
    assert metrics["recipe"] == "fast" and metrics["device"] == "cpu"
    assert {"torch", "torchvision", "python"} <= set(metrics["versions"])
    assert set(metrics["epochs"][0]) == {"epoch", "train_loss", "test_loss", "test_accuracy", "seconds"}
    assert (trained_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (trained_dir / "checkpoint.pt").exists()  # a finished run leaves no checkpoint


def test_same_seed_same_metrics(tmp_path):
    cfg = dict(epochs=1, seed=7, limit=LIMIT)
    a = train(make_config("fast", **cfg), tmp_path / "a")
    b = train(make_config("fast", **cfg), tmp_path / "b")
    assert [(h.train_loss, h.test_loss, h.test_accuracy) for h in a.history] == [
        (h.train_loss, h.test_loss, h.test_accuracy) for h in b.history]
    sa = torch.load(tmp_path / "a" / "model.pth", weights_only=True)
    sb = torch.load(tmp_path / "b" / "model.pth", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_other_seed_other_weights(tmp_path):
    a = train(make_config("fast", epochs=1, seed=1, limit=LIMIT), tmp_path / "a")
    b = train(make_config("fast", epochs=1, seed=2, limit=LIMIT), tmp_path / "b")
    assert a.history[0].train_loss != b.history[0].train_loss


def test_tutorial_recipe_is_the_tutorials():
    cfg = make_config("tutorial")
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.loader, cfg.shuffle) == (
        "sgd", 1e-3, 64, 10, "dataloader", False)


def test_limit_trains_on_the_first_images_with_either_loader(tmp_path):
    fast, tutorial = make_config("fast", limit=1000), make_config("tutorial", limit=100)
    assert _Batches(fast, "cpu", None, False).steps_per_epoch() == 2  # 512 + 488
    batches = _Batches(tutorial, "cpu", None, False)
    assert batches.steps_per_epoch() == 2 and [len(y) for _, y in batches(0, 0)] == [64, 36]
    assert _Batches(make_config("fast", limit=10**9), "cpu", None, False).steps_per_epoch() == 118  # all 60,000
    assert_one_line_error(cli_run("train", "--limit", "0", "-q", "--out-dir", tmp_path), 2, "--limit")


def test_tutorial_recipe_first_epoch(tmp_path):
    # The tutorial prints 47.6% after its first epoch: plain SGD at 1e-3 learns slowly.
    result = train(make_config("tutorial", epochs=1), tmp_path)
    assert 30 < result.test_accuracy < 65


def test_onecycle_schedule_warms_up_then_decays():
    cfg = make_config("fast")
    lrs = [lr_at(s, 1000, cfg) for s in range(1000)]
    peak = max(range(1000), key=lrs.__getitem__)
    assert lrs[0] < lrs[peak] == pytest.approx(cfg.lr)
    assert lrs[-1] < 0.01 * cfg.lr


def _train_cmd(out) -> list[str]:
    return [sys.executable, "-m", "fmnist_onnx", "train", "--epochs", "3", "--seed", "3", "--device", "cpu", "-q",
            "--limit", str(LIMIT), "--out-dir", str(out)]


def test_resume_after_ctrl_c_equals_uninterrupted(tmp_path):
    full = run_cli(*_train_cmd(tmp_path / "full")[3:])
    assert full.returncode == 0, full.stderr

    steps = math.ceil(LIMIT / make_config("fast").batch_size)  # an epoch of the (limited) training set
    # held (fmnist_onnx/testing.py) 4 steps into epoch 2; Ctrl-C then, and the loop sees it once released
    with Held(_train_cmd(tmp_path / "cut"), f"{TRAIN_AFTER_STEP}:{steps + 4}", stdout=subprocess.PIPE,
              stderr=subprocess.PIPE, text=True) as held:
        held.wait()
        held.proc.send_signal(signal.SIGINT)
        held.release()
        _, stderr = held.proc.communicate(timeout=120)
    assert held.proc.returncode == 130, stderr
    assert "--resume" in stderr
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    assert ckpt.exists() and not (tmp_path / "cut" / "model.pth").exists()
    state = torch.load(ckpt, weights_only=True)
    # mid-epoch: epoch 2 (index 1) in progress, its first 4 steps done (5 if the handler ran after the release)
    assert state["epoch"] == 1 and 4 <= state["step"] <= 5 < steps, (state["epoch"], state["step"])
    assert state["config"]["limit"] == LIMIT  # --resume goes on with the run's own training set

    resumed = run_cli("train", "--resume", "-q", "--out-dir", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "full" / "model.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((tmp_path / "full" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert [e["test_accuracy"] for e in ma["epochs"]] == [e["test_accuracy"] for e in mb["epochs"]]


def test_new_run_refuses_to_discard_a_checkpoint(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert_one_line_error(run_cli("train", "-q", "--out-dir", tmp_path), 2, "--resume")


def test_resume_without_checkpoint(tmp_path):
    assert_one_line_error(run_cli("train", "--resume", "-q", "--out-dir", tmp_path), 2, "no checkpoint")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_missing_is_an_error_not_a_cpu_run(tmp_path):
    proc = run_cli("train", "--device", "cuda", "-q", "--out-dir", tmp_path)
    assert_one_line_error(proc, 2, "CUDA")
    assert not (tmp_path / "model.pth").exists()


def test_auto_device_says_which(tmp_path):
    proc = run_cli("train", "--device", "auto", "--epochs", "0")
    assert proc.returncode == 2  # a usage error, caught before any training
    # the line comes once the usage checks passed (a missing dataset is refused before torch is imported): a
    # short real run on the first 512 images
    proc = run_cli("train", "--epochs", "1", "--limit", "512", "--out-dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "device: cpu (auto)" in proc.stderr or "device: cuda (auto)" in proc.stderr


def _train_logged(tmp_path, *args: str) -> str:
    """A run with its stderr going to a file (as under nohup, CI or a job scheduler); the file's text."""
    log = tmp_path / "stderr.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "fmnist_onnx", "train", "--device", "cpu", "--out-dir",
                               str(tmp_path / "out"), *args], stdout=subprocess.DEVNULL, stderr=f)
    assert proc.returncode == 0, log.read_text()
    return log.read_text()


def test_stderr_to_a_file_gets_a_line_per_epoch(tmp_path):
    text = _train_logged(tmp_path, "--epochs", "2", "--limit", str(LIMIT))
    epochs = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"], text
    assert all("test accuracy" in line and line.endswith(" s") for line in epochs), text
    assert "\r" not in text  # no bar: a log has no use for carriage returns


def test_quiet_writes_nothing_on_stderr(tmp_path):
    assert _train_logged(tmp_path, "--epochs", "1", "--limit", str(LIMIT), "--quiet") == ""


def test_existing_outputs_are_refused_before_the_first_step(tmp_path):
    (tmp_path / "metrics.json").write_text("mine")
    # held at the first step, the run would fail this test by hanging: it must be refused before
    with Held(_train_cmd(tmp_path), f"{TRAIN_AFTER_STEP}:1", stderr=subprocess.PIPE, text=True) as held:
        _, stderr = held.proc.communicate(timeout=120)
    assert held.proc.returncode == 2 and "metrics.json exists; use --overwrite" in stderr, stderr
    assert (tmp_path / "metrics.json").read_text() == "mine"


def test_resume_keeps_the_overwrite_the_run_started_with(tmp_path):
    (tmp_path / "model.pth").write_bytes(b"old")
    cmd = [*_train_cmd(tmp_path), "--epochs", "1", "--overwrite"]
    with Held(cmd, f"{TRAIN_AFTER_STEP}:5", stderr=subprocess.PIPE, text=True) as held:
        held.wait()
        held.proc.send_signal(signal.SIGINT)
        held.release()
        held.proc.communicate(timeout=120)
    assert held.proc.returncode == 130
    assert (tmp_path / "model.pth").read_bytes() == b"old"
    resumed = run_cli("train", "--resume", "-q", "--out-dir", tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(tmp_path / "model.pth", weights_only=True).keys()


def test_a_second_train_on_the_same_folder_is_refused(tmp_path):
    with Held(_train_cmd(tmp_path), f"{TRAIN_AFTER_STEP}:1") as held:
        pid = held.wait()
        second = run_cli(*_train_cmd(tmp_path)[3:])
    assert_one_line_error(second, 2, f"process {pid}")
