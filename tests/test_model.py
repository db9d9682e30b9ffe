"""The tutorial's MLP and the safe weights loader."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fmnist_onnx.errors import UserError
from fmnist_onnx.model import NeuralNetwork, load_model, load_state_dict


class TutorialNetwork(nn.Module):
    """The quickstart tutorial's class, as its own code defines it (seed/quickstart-tutorial-es.md)."""

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )

    def forward(self, x):
        return self.linear_relu_stack(self.flatten(x))


def test_tutorial_state_dict_loads_here(tmp_path):
    tutorial = TutorialNetwork()
    torch.save(tutorial.state_dict(), tmp_path / "model.pth")  # what the tutorial writes
    ours = load_model(tmp_path / "model.pth")
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(ours(x), tutorial(x))


def test_our_state_dict_loads_in_tutorial_code(weights):
    tutorial = TutorialNetwork()
    tutorial.load_state_dict(torch.load(weights, weights_only=True))  # the tutorial's own loading line
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(tutorial(x), load_model(weights)(x))


def test_architecture_is_the_tutorials():
    model = NeuralNetwork()
    assert isinstance(model.flatten, nn.Flatten)
    assert [type(m) for m in model.linear_relu_stack] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert sum(p.numel() for p in model.parameters()) == 669_706


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_state_dict(tmp_path / "nope.pth")


def test_not_a_torch_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(UserError, match="not a PyTorch weights file"):
        load_state_dict(bad)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"linear_relu_stack.0.weight": _Exploit(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refused to load"):
        load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_wrong_keys(tmp_path):
    torch.save({"fc.weight": torch.zeros(10, 784)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="missing .*linear_relu_stack.0.weight.*unexpected fc.weight"):
        load_state_dict(tmp_path / "other.pth")


def test_wrong_shapes(tmp_path):
    state = NeuralNetwork().state_dict()
    state["linear_relu_stack.4.weight"] = torch.zeros(5, 512)
    torch.save(state, tmp_path / "five.pth")
    with pytest.raises(UserError, match=r"linear_relu_stack.4.weight has shape \(5, 512\)"):
        load_state_dict(tmp_path / "five.pth")


def test_not_a_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(UserError, match="not a state_dict"):
        load_state_dict(tmp_path / "list.pth")


# What a process started by the command line reports: usable cores, torch's threads after use_usable_cores, the
# spin count libgomp was started with (fmnist_onnx/__init__.py sets it before torch is imported).
_THREADS = ("import os, fmnist_onnx.model as m, torch; from fmnist_onnx.runtime import usable_cores; "
            "print(usable_cores(), m.use_usable_cores(), torch.get_num_threads(), os.environ.get('GOMP_SPINCOUNT'))")


def _threads(env: dict | None = None, cpus: set[int] | None = None) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", _THREADS], env=base | (env or {}), capture_output=True, text=True,
                          check=True, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None
                          ).stdout.split()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to take one away")
def test_torch_threads_follow_the_affinity_mask():
    """taskset -c 0 (or a container's cpuset) leaves one core: one thread, not one per core of the machine."""
    allowed = os.sched_getaffinity(0)
    assert _threads()[:3] == [str(len(allowed))] * 3
    assert _threads(cpus={min(allowed)})[:3] == ["1", "1", "1"]


def test_a_users_omp_num_threads_wins():
    assert _threads({"OMP_NUM_THREADS": "1"})[1:3] == ["1", "1"]


@pytest.mark.parametrize("env, expected", [
    ({}, "10000"),  # threads sleep soon at a barrier: no core held long beside busy processes (issue 28)
    ({"GOMP_SPINCOUNT": "300000"}, "300000"),  # the user's own value wins
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "None"),  # and so does their wait policy, which a spin count would override
])
def test_openmp_spin_count_is_set_before_torch_unless_the_user_set_one(env, expected):
    assert _threads(env)[3] == expected
