"""Fashion-MNIST from the Debian ``dataset-fashion-mnist`` package: loading, normalisation and accuracy."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from grailc.errors import GrailcError

DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN = 0.2860406
STD = 0.3530242

_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_OFFSET = 16
_LABEL_OFFSET = 8
_SIDE = 28


def _read_idx(path: Path, offset: int) -> np.ndarray:
    if not path.is_file():
        raise GrailcError(
            "Fashion-MNIST file not found", where=str(path), fix="apt-get install -y dataset-fashion-mnist"
        )
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(split: Literal["train", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 ``[N, 28, 28]`` and labels as int64 ``[N]`` for the ``train`` or ``test`` split."""
    if split not in _PREFIX:
        raise GrailcError(f"unknown Fashion-MNIST split {split!r}", fix="use 'train' or 'test'")
    if not DATASET_DIR.is_dir():
        raise GrailcError(
            "Fashion-MNIST is not installed",
            where=str(DATASET_DIR),
            fix="apt-get install -y dataset-fashion-mnist",
        )
    prefix = _PREFIX[split]
    pixels = _read_idx(DATASET_DIR / f"{prefix}-images-idx3-ubyte.gz", _IMAGE_OFFSET)
    labels = _read_idx(DATASET_DIR / f"{prefix}-labels-idx1-ubyte.gz", _LABEL_OFFSET)
    images = pixels.reshape(-1, _SIDE, _SIDE)
    if len(images) != len(labels):
        raise GrailcError(
            f"Fashion-MNIST {split} split has {len(images)} images but {len(labels)} labels",
            where=str(DATASET_DIR),
            fix="reinstall the package: apt-get install --reinstall -y dataset-fashion-mnist",
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` images as normalised float32 ``[N, 1, 28, 28]`` model inputs."""
    return ((images.to(torch.float32) / 255.0 - MEAN) / STD).unsqueeze(1)


def accuracy(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode; an exported graph already is) on uint8 ``images``."""
    if not isinstance(model, torch.fx.GraphModule):
        model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(to_inputs(images[start : start + batch_size]))
            correct += (logits.argmax(dim=1) == labels[start : start + batch_size]).sum().item()
    return correct / len(images)
