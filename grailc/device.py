"""Which device a compile computes on: ``--device auto|cpu|cuda``.

``auto`` is CUDA when ``torch.cuda.is_available()``, else the CPU. Under ``torchrun`` each process takes the GPU
numbered by its ``LOCAL_RANK`` (one GPU per process, as torchrun places them). Asking for CUDA where there is none
is a user error, not a silent fall-back to the CPU.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import fx

from grailc.errors import RecipeError
from grailc.surgery import owner_of

CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | None) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` (or ``cuda:N``) -> a torch.device this process can use."""
    name = (name or "auto").strip().lower()
    kind = name.partition(":")[0]
    if kind not in CHOICES or (name != kind and kind != "cuda"):
        raise RecipeError(f"unknown device {name!r}", fix="give --device auto, cpu or cuda (or cuda:N)")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RecipeError(
            f"--device {name} was asked for, but PyTorch sees no CUDA device here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'})",
            fix="run on a machine with an NVIDIA GPU and a CUDA build of PyTorch, or give --device cpu "
            "(or auto: the GPU when there is one)",
        )
    count = torch.cuda.device_count()
    number = name.partition(":")[2] if ":" in name else os.environ.get("LOCAL_RANK", "0") or "0"
    if not number.isdigit():
        raise RecipeError(f"cannot read the GPU number in --device {name!r} (LOCAL_RANK={number!r})",
                          fix="give --device cuda (or cuda:N, N a GPU index)")
    index = int(number)
    if not 0 <= index < count:
        raise RecipeError(
            f"--device {name} needs GPU {index}, but this machine has {count} (cuda:0 to cuda:{count - 1})",
            fix="start at most one process per GPU (torchrun --nproc-per-node N with N <= the GPU count)",
        )
    return torch.device("cuda", index)


def move_graph(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """``gm`` computing on ``device``, in place: its parameters, buffers and tensor constants moved there, and every
    device argument of its nodes (``arange(..., device=cpu)`` baked in by the trace) pointing there."""
    changed = False

    def swap(a):
        nonlocal changed
        if isinstance(a, torch.device) and a != device:
            changed = True
            return device
        return a

    for node in gm.graph.nodes:
        node.args = fx.node.map_aggregate(node.args, swap)
        node.kwargs = fx.node.map_aggregate(node.kwargs, swap)
        if node.op == "get_attr":
            owner, name = owner_of(gm, node.target)
            value = getattr(owner, name, None)
            if isinstance(value, torch.Tensor) and name not in owner._parameters and name not in owner._buffers:
                setattr(owner, name, value.to(device))  # a plain tensor attribute, which Module.to leaves
    if changed:
        gm.recompile()
    return gm.to(device)


def inputs_to(batches: list[tuple[torch.Tensor, ...]], device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Every tensor of every batch on ``device``."""
    return [tuple(t.to(device) for t in batch) for batch in batches]


@contextlib.contextmanager
def exact_float32(device: torch.device):
    """float32 convolutions and matrix products in full precision on a GPU (no TF32, which cuDNN uses for
    convolutions by default: about 1e-3 relative, which the Grams and the self-check would see), restored after."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
