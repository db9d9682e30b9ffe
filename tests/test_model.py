"""The tutorial's MLP and the safe weights loader."""

from __future__ import annotations

import os

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
