"""Trained reference models shipped with grailc."""

from __future__ import annotations

from pathlib import Path

import torch

from grailc.errors import GrailcError


def load_checkpoint(model: torch.nn.Module, path: Path, what: str, script: str) -> torch.nn.Module:
    """``model`` with the shipped safetensors weights at ``path``, in eval mode; a clear error when they are
    missing (``script`` trains them again)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise GrailcError(f"the {what} checkpoint is missing", where=str(path), fix=f"run `python {script}`")
    model.load_state_dict(load_file(path))
    return model.eval()
