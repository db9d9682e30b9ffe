"""The quickstart tutorial's MLP, and a safe loader for its weights."""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from fmnist_onnx.errors import UserError

log = logging.getLogger(__name__)


class NeuralNetwork(nn.Module):
    """Exactly the tutorial's network, so that its model.pth loads here and ours loads there."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        return self.linear_relu_stack(x)


def use_usable_cores() -> int:
    """Give torch one thread per core this process may use (its affinity mask and cgroup quota: torch's own
    count is the machine's, a container limited to 2 CPUs on a 64-core host would start 64), unless the user
    set OMP_NUM_THREADS. The thread count only: how long the threads spin is GOMP_SPINCOUNT's, set by
    fmnist_onnx/__init__.py before torch is imported. Returns the count torch runs with."""
    from fmnist_onnx.runtime import usable_cores

    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(usable_cores())
    return torch.get_num_threads()


def expected_shapes() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in NeuralNetwork().state_dict().items()}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a model.pth with weights_only=True and check it is this model's state_dict.

    Raises UserError with one line naming the problem: missing file, not a torch file, a pickle that
    would run code, or the wrong keys or shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything but tensors and plain containers. Name the global it refused (a pickle
        # that would call code); any other unpickling failure means the bytes are not a torch file at all.
        refused = re.search(r"(?:unsupported )?GLOBAL ([\w.]+)", str(e), re.IGNORECASE)
        if refused:
            raise UserError(f"{path}: refused to load: it would call {refused.group(1)} (only plain weights are "
                            "loaded)") from None
        raise UserError(f"{path}: not a PyTorch weights file") from None
    except Exception as e:  # noqa: BLE001 - arbitrary bytes make the unpickler raise arbitrary errors
        log.debug("torch.load(%s) failed: %r", path, e)
        raise UserError(f"{path}: not a PyTorch weights file") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state_dict (a dict of tensors), found {type(state).__name__}")
    want = expected_shapes()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise UserError(f"{path}: not the quickstart MLP's state_dict: {'; '.join(parts)}")
    for key, shape in want.items():
        if tuple(state[key].shape) != shape:
            raise UserError(
                f"{path}: not the quickstart MLP's state_dict: {key} has shape "
                f"{tuple(state[key].shape)}, expected {shape}"
            )
    return {k: v.float() for k, v in state.items()}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> NeuralNetwork:
    """A NeuralNetwork in eval mode with the weights of ``path``."""
    model = NeuralNetwork()
    model.load_state_dict(load_state_dict(path))
    return model.to(device).eval()
