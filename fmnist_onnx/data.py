"""Find Fashion-MNIST without a network and load it through torchvision, as the tutorial does.

Search order: --data-dir, $FMNIST_DATA, Debian's dataset-fashion-mnist, then torchvision's download
(only when asked). torchvision's FashionMNIST wants ``ROOT/FashionMNIST/raw/<idx files, unzipped>``;
files found elsewhere are laid out that way once, in a cache folder.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fmnist_onnx.errors import UserError

if TYPE_CHECKING:  # torch is imported lazily, inside the functions that load data
    import torch

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FMNIST_DATA"
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass
class Split:
    """One split as tensors: images uint8 [N, 28, 28], labels int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def as_float(self) -> torch.Tensor:
        """[N, 1, 28, 28] float32 in [0, 1]: exactly what ToTensor gives, image by image."""
        return self.images.unsqueeze(1).float().div_(255)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fmnist-onnx"


def _idx_source(folder: Path) -> dict[str, Path] | None:
    """The four idx files in ``folder`` (gzipped or not), or None if any is missing."""
    found = {}
    for name in IDX_FILES:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            return None
    return found


def _raw_root(folder: Path) -> Path | None:
    """A torchvision root for ``folder``: the folder itself, or one prepared in the cache."""
    raw = folder / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in IDX_FILES):
        return folder
    files = _idx_source(raw) or _idx_source(folder)
    if files is None:
        return None
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    root = cache_dir() / "data" / key
    dest = root / "FashionMNIST" / "raw"
    if all((dest / name).is_file() for name in IDX_FILES):
        return root
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        tmp = dest / f".{name}.tmp{os.getpid()}"
        opener = gzip.open if src.suffix == ".gz" else open
        try:
            with opener(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        except (OSError, EOFError) as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot read {src}: {e}") from None
        os.replace(tmp, dest / name)  # atomic: a half-copied file never looks prepared
    log.info("prepared %s from %s", dest, folder)
    return root


def find_root(data_dir: str | Path | None = None, download: bool = False) -> Path:
    """The torchvision root to load Fashion-MNIST from, or UserError saying where we looked."""
    looked: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if data_dir is not None:
        candidates.append(("--data-dir", Path(data_dir)))
    elif os.environ.get(ENV_VAR):
        candidates.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR])))
    else:
        candidates.append(("Debian's dataset-fashion-mnist", DEBIAN_DIR))
        candidates.append(("the download cache", cache_dir() / "download"))
    for label, folder in candidates:
        looked.append(f"{folder} ({label})")
        if folder.is_dir():
            root = _raw_root(folder)
            if root is not None:
                return root
    if download:
        root = cache_dir() / "download"
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(root, train=True, download=True)
            FashionMNIST(root, train=False, download=True)
        except Exception as e:  # torchvision raises RuntimeError/URLError/OSError for a failed download
            raise UserError(f"download of Fashion-MNIST failed: {e}") from None
        return root
    raise UserError(
        "Fashion-MNIST not found. Looked in: "
        + "; ".join(looked)
        + ". Install it with `apt-get install dataset-fashion-mnist` (Debian), point --data-dir or "
        f"${ENV_VAR} at a folder holding the four idx files (gzipped or not), or pass --download "
        "where there is network."
    )


def load_split(train: bool, data_dir: str | Path | None = None, download: bool = False) -> Split:
    """A whole split as tensors, read through torchvision's FashionMNIST."""
    from torchvision.datasets import FashionMNIST

    root = find_root(data_dir, download)
    try:
        ds = FashionMNIST(root, train=train, download=False)
    except (RuntimeError, OSError, ValueError, AssertionError) as e:
        raise UserError(f"Fashion-MNIST files under {root} are unreadable: {e}") from None
    return Split(images=ds.data, labels=ds.targets)


def load_dataset(train: bool, data_dir: str | Path | None = None, download: bool = False, transform=None):
    """torchvision's FashionMNIST dataset object (for the tutorial recipe's DataLoader)."""
    from torchvision.datasets import FashionMNIST

    root = find_root(data_dir, download)
    return FashionMNIST(root, train=train, download=False, transform=transform)
