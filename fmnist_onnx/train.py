"""Train the quickstart MLP: the tutorial's recipe as written, or a fast one on in-memory tensors.

Both recipes run through one loop that checkpoints after every epoch and on Ctrl-C (after the step in
flight, never in the middle of an optimizer update), so ``--resume`` ends with the same weights as an
uninterrupted run: the shuffle of each epoch is drawn from (seed, epoch) alone, and the learning rate is a
pure function of the step number.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fmnist_onnx import spec
from fmnist_onnx.data import Split, load_dataset, load_split
from fmnist_onnx.errors import Interrupted, UserError
from fmnist_onnx.files import OutputLock, atomic_write, atomic_write_text, check_output, open_existing
from fmnist_onnx.machine import library_versions
from fmnist_onnx.model import NeuralNetwork, use_usable_cores
from fmnist_onnx.signals import StopSignals
from fmnist_onnx.testing import TRAIN_AFTER_STEP, pause_point

log = logging.getLogger(__name__)

CHECKPOINT = spec.TRAIN_CHECKPOINT
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    recipe: str = "fast"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    optimizer: str = "adamw"  # adamw | sgd
    weight_decay: float = 0.0
    schedule: str = "onecycle"  # onecycle (linear warm-up, cosine decay) | constant
    warmup: float = 0.2  # fraction of all steps spent warming up (onecycle)
    loader: str = "tensors"  # tensors (whole split in memory/on device) | dataloader (the tutorial's)
    shuffle: bool = True
    label_smoothing: float = 0.0
    hflip: bool = False  # mirror a random half of each batch (clothes are left-right symmetric)
    precision: str = "auto"  # auto (bf16 autocast where the hardware has fast bf16) | fp32 | bf16
    seed: int = 0
    device: str = "cpu"
    limit: int | None = None  # train on the first N training images only (None: all 60,000); tests all 10,000


# fast: tuned on this project's 2-core machine (docs/training.md): 89.7% median of 3 seeds in about 10 s.
# The tutorial, as written: SGD at 1e-3, batches of 64 in file order through a DataLoader with ToTensor.
RECIPES: dict[str, dict] = {
    "fast": dict(epochs=10, batch_size=512, lr=3e-3, optimizer="adamw", weight_decay=0.0, warmup=0.1,
                 label_smoothing=0.1, schedule="onecycle", loader="tensors", shuffle=True, precision="auto"),
    "tutorial": dict(epochs=10, batch_size=64, lr=1e-3, optimizer="sgd", weight_decay=0.0,
                     schedule="constant", loader="dataloader", shuffle=False, precision="fp32"),
}


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    config: TrainConfig
    history: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0
    out_dir: Path = Path("artifacts")

    @property
    def test_accuracy(self) -> float:
        return self.history[-1].test_accuracy if self.history else float("nan")


def make_config(recipe: str = "fast", **overrides) -> TrainConfig:
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    values = dict(RECIPES[recipe], recipe=recipe)
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0 or (cfg.limit is not None and cfg.limit < 1):
        raise UserError("--epochs, --batch-size and --limit must be >= 1 and --lr > 0")
    return cfg


def resolve_device(requested: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is not there is an error."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested == "cuda" and not cuda:
        raise UserError("--device cuda: no CUDA device is available to PyTorch on this machine "
                        f"(torch {torch.__version__}); use --device cpu or auto")
    if requested == "mps" and not mps:
        raise UserError("--device mps: Apple's MPS backend is not available on this machine")
    if requested not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {requested!r}")
    return requested


def autocast_dtype(cfg: TrainConfig, device: str) -> torch.dtype | None:
    """bf16 autocast (fp32 master weights) where matrix products are fast in bf16, else None (fp32).

    On CPUs with AVX512-BF16 or AMX, bf16 halves the step time of this MLP at no cost in accuracy.
    """
    if cfg.precision == "fp32" or device == "mps":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UserError(f"unknown optimizer {cfg.optimizer!r}")


class _Batches:
    """Batches of one epoch, from step ``start`` on, in an order fixed by (seed, epoch)."""

    def __init__(self, cfg: TrainConfig, device: str, data_dir, download: bool) -> None:
        self.cfg = cfg
        self.device = device
        first = slice(cfg.limit)  # --limit: the first N images, in the files' order
        if cfg.loader == "tensors":
            whole = load_split(True, data_dir, download)
            split = Split(whole.images[first], whole.labels[first])
            self.x = split.as_float().to(device)
            self.y = split.labels.to(device)
            self.n = len(self.y)
        else:
            from torchvision.transforms import ToTensor

            self.dataset = load_dataset(True, data_dir, download, transform=ToTensor())
            if cfg.limit is not None:
                self.dataset = torch.utils.data.Subset(self.dataset, range(min(cfg.limit, len(self.dataset))))
            self.n = len(self.dataset)

    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.cfg.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.cfg.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def flips(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch + 50_000)
        return torch.rand(self.n, generator=g) < 0.5

    def __call__(self, epoch: int, start: int):
        bs = self.cfg.batch_size
        idx = self.order(epoch)[start * bs:]
        if self.cfg.loader == "tensors":
            idx = idx.to(self.device)
            flips = self.flips(epoch)[start * bs:].to(self.device) if self.cfg.hflip else None
            for i in range(0, len(idx), bs):
                j = idx[i:i + bs]
                x = self.x[j]
                if flips is not None:
                    x = torch.where(flips[i:i + bs, None, None, None], x.flip(-1), x)
                yield x, self.y[j]
        else:
            loader = torch.utils.data.DataLoader(self.dataset, batch_size=bs, sampler=idx.tolist())
            for x, y in loader:
                yield x.to(self.device), y.to(self.device)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in %) on tensors already on the model's device."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i:i + batch_size])
        loss_sum += nn.functional.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + batch_size]).sum().item()
    model.train()
    return loss_sum / len(y), 100.0 * correct / len(y)


OUTPUTS = spec.TRAIN_OUTPUTS


def _save_checkpoint(path: Path, state: dict) -> None:
    # the run's own state: replaced at every epoch (a link there is replaced itself, never followed)
    atomic_write(path, lambda f: torch.save(state, f), overwrite=True)


def _load_checkpoint(path: Path) -> dict:
    if not os.path.lexists(path):
        raise UserError(f"--resume: no checkpoint at {path} (nothing was interrupted there)")
    try:
        with os.fdopen(open_existing(path), "rb") as f:  # never through a link
            state = torch.load(f, map_location="cpu", weights_only=True)
    except UserError as e:
        raise UserError(f"--resume: {e}") from None
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same user-facing problem
        raise UserError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"--resume: {path} is not a checkpoint written by this version of fmnist-onnx")
    if not isinstance(state.get("overwrite", False), bool):
        raise UserError(f"--resume: {path} is damaged (its overwrite field is not true or false)")
    return state


def _start(out: Path, resume: bool, overwrite: bool) -> tuple[dict | None, bool]:
    """The checkpoint to continue (None: a new run) and the run's --overwrite: on --resume, the one recorded
    when the run started. The outputs are checked here, before the first step, not after the last epoch."""
    ckpt_path = out / CHECKPOINT
    state = None
    if resume:
        state = _load_checkpoint(ckpt_path)
        overwrite = state.get("overwrite", False)
    elif os.path.lexists(ckpt_path) and not overwrite:
        raise UserError(f"{ckpt_path} holds an interrupted run: pass --resume to continue it, "
                        "or --overwrite to discard it")
    for name in OUTPUTS:
        check_output(out / name, overwrite)
    return state, overwrite


def train(
    cfg: TrainConfig,
    out_dir: str | Path = "artifacts",
    data_dir: str | Path | None = None,
    download: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    device: str | None = None,
) -> TrainResult:
    """Train, checkpointing as it goes; write model.pth, metrics.json and training_curves.png (existing ones
    only with ``overwrite``, which also discards an interrupted run's checkpoint), holding a lock on model.pth.

    With ``resume``, the config and ``overwrite`` come from the checkpoint (``device`` may still be changed).
    Raises errors.Interrupted (after saving a checkpoint; ``saved`` is its path) when stopped by SIGINT or
    SIGTERM.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out / "model.pth"):
        state, overwrite = _start(out, resume, overwrite)
        if state is not None:
            cfg = TrainConfig(**state["config"])
            if device is not None:
                cfg.device = device
        return _train(cfg, out, state, overwrite, data_dir, download, progress)


def _fresh() -> dict:
    """An epoch's sums before its first step (a checkpoint's "partial")."""
    return {"loss_sum": 0.0, "count": 0, "seconds": 0.0}


@dataclass
class _Loop:
    """What the steps change (the model, the optimizer, the history) and what they read (the config, the
    batches): one epoch at a time, and a checkpoint of it all."""

    cfg: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: list[EpochRecord]
    batches: _Batches | None = None

    def run_epoch(self, epoch: int, first: int, part: dict, stop: StopSignals, progress: bool) -> int:
        """The steps of ``epoch`` from step ``first`` to its end, or to the step after a stop signal; its loss and
        images summed into ``part``. Returns the step reached."""
        from fmnist_onnx.progress import bar as progress_bar

        cfg, model, optimizer = self.cfg, self.model, self.optimizer
        steps = self.batches.steps_per_epoch()
        amp = autocast_dtype(cfg, cfg.device)
        dev_type = torch.device(cfg.device).type
        # a bar on a terminal only: in a log, the epoch's own line (in _train) is the progress
        bar = progress_bar(f"epoch {epoch + 1}/{cfg.epochs}", enabled=progress, total=steps, initial=first,
                           unit="step", lines=False, leave=False, dynamic_ncols=True)
        # Loss is summed on the device and read once per epoch: a .item() per step would sync a GPU.
        loss_acc = torch.zeros((), device=cfg.device)
        step = first
        for x, y in self.batches(epoch, first):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps + step, steps * cfg.epochs, cfg)
            with torch.autocast(dev_type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = nn.functional.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_acc += loss.detach() * len(y)
            part["count"] += len(y)
            step += 1
            pause_point(TRAIN_AFTER_STEP)  # tests hold the run here (testing.py)
            if not bar.disable:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            if stop.signum is not None:
                break
        bar.close()
        part["loss_sum"] += float(loss_acc)
        return step

    def checkpoint(self, epoch: int, step: int, part: dict, overwrite: bool) -> dict:
        """What checkpoint.pt holds for a run that goes on at ``step`` of ``epoch`` (``_restore`` reads it)."""
        return {
            "format": CHECKPOINT_FORMAT, "config": asdict(self.cfg), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "history": [asdict(h) for h in self.history],
            "epoch": epoch, "step": step, "partial": part, "overwrite": overwrite,
        }


def _restore(cfg: TrainConfig, state: dict | None) -> tuple[_Loop, int, int, dict]:
    """A new model and optimizer (seeded), or the checkpoint's: the loop, and where it goes on (epoch, step,
    the epoch's partial sums)."""
    torch.manual_seed(cfg.seed)
    model = NeuralNetwork().to(cfg.device)
    loop = _Loop(cfg, model, make_optimizer(model, cfg), [])
    if state is None:
        return loop, 0, 0, _fresh()
    model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.history = [EpochRecord(**h) for h in state["history"]]
    return loop, state["epoch"], state["step"], dict(state["partial"])


def _train(cfg: TrainConfig, out: Path, state: dict | None, overwrite: bool, data_dir, download: bool,
           progress: bool) -> TrainResult:
    from fmnist_onnx.progress import note

    use_usable_cores()  # the same count for a seed, busy or not: the weights never depend on the load
    ckpt_path = out / CHECKPOINT
    loop, start_epoch, start_step, partial = _restore(cfg, state)
    if state is not None:
        log.info("resuming %s at epoch %d, step %d", ckpt_path, start_epoch + 1, start_step)
    loop.batches = _Batches(cfg, cfg.device, data_dir, download)
    test = load_split(False, data_dir, download)
    test_x, test_y = test.as_float().to(cfg.device), test.labels.to(cfg.device)

    loop.model.train()
    with StopSignals() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            first, part = (start_step, partial) if epoch == start_epoch else (0, _fresh())
            t0 = time.perf_counter() - part["seconds"]
            step = loop.run_epoch(epoch, first, part, stop, progress)
            if stop.signum is not None:
                part["seconds"] = time.perf_counter() - t0
                _save_checkpoint(ckpt_path, loop.checkpoint(epoch, step, part, overwrite))
                raise Interrupted(stop.signum, ckpt_path,
                                  f"checkpoint saved to {ckpt_path}; run again with --resume to continue.")
            test_loss, test_acc = evaluate(loop.model, test_x, test_y)
            rec = EpochRecord(epoch + 1, part["loss_sum"] / max(1, part["count"]), test_loss, test_acc,
                              time.perf_counter() - t0)
            loop.history.append(rec)
            _save_checkpoint(ckpt_path, loop.checkpoint(epoch + 1, 0, _fresh(), overwrite))
            if progress:
                note(f"epoch {rec.epoch:>2}/{cfg.epochs}  train loss {rec.train_loss:.4f}  "
                     f"test loss {rec.test_loss:.4f}  test accuracy {rec.test_accuracy:.2f}%  "
                     f"{rec.seconds:.1f} s")

    # Seconds are the sum of the epochs' own times, so an interrupted and resumed run reports its training
    # time, not the pause in between.
    history = loop.history
    result = TrainResult(cfg, history, sum(h.seconds for h in history), out)
    _write_outputs(result, loop.model, overwrite)
    ckpt_path.unlink(missing_ok=True)
    return result


def _write_outputs(result: TrainResult, model: nn.Module, overwrite: bool) -> None:
    out = result.out_dir
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(out / "model.pth", lambda f: torch.save(state, f), overwrite)
    metrics = {
        "recipe": result.config.recipe,
        "hyperparameters": asdict(result.config),
        "seed": result.config.seed,
        "device": result.config.device,
        "test_accuracy": result.test_accuracy,
        "seconds": result.seconds,
        "epochs": [asdict(h) for h in result.history],
        "versions": library_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n", overwrite)
    try:
        from fmnist_onnx.plots import training_curves

        training_curves(result.history, out / "training_curves.png", title=f"recipe {result.config.recipe}",
                        label_smoothing=result.config.label_smoothing, overwrite=overwrite)
    except ImportError as e:  # matplotlib is optional for the numbers themselves
        log.warning("no training_curves.png: %s", e)
