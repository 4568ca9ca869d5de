"""Data-parallel calibration: W processes started by ``torchrun`` share the calibration batches (gloo on the CPU,
NCCL on GPUs).

Every process loads the same model and calibration data; batch i (in the order the compile fits them) is run by
the process of rank i % W, which accumulates its share of every statistic a pass reads,

    G_p = sum x x^T,   C_p = sum x z^T,   s_p = sum x,   sum x^2,   n_p = rows,   BatchNorm sums, ...

over its own rows. Where a statistic becomes final (after accumulation, before anything is decided from it) it is
summed over the processes, G = sum_p G_p (``all_reduce_stats``: all-reduce, SUM, in the statistic's own dtype:
float64 for Grams, int64 for counts). The sums are exact up to the order of the float64 additions, so the result
is the one-process compile up to rounding.

Every process then runs the same deterministic selection and solve on the same sums. That is simpler than rank 0
solving and broadcasting: sequential calibration needs each process's shadow model compressed consumer by consumer with
the same maps before it can take the next consumer's statistics, so every process needs the decisions and maps
anyway, and recomputing them costs one solve per group against a broadcast of every map. ``agree`` then checks
that all processes hold bitwise the same compressed weights (one fingerprint compared), so a process that computed
something else (different hardware or libraries rounding differently) is a verification failure, never a silently
different model. Only rank 0 writes outputs and prints.

Without a process group (a plain ``grailc`` run, or ``torchrun`` with one process) every function here is a no-op
for rank 0 of 1.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from grailc.errors import CalibrationError, GrailcError, RecipeError, VerificationError

# how long a process waits for the others at a collective; one group's solve (SlimGPT's greedy removal on a 28k-wide
# MLP) can take many minutes, and a process that died is noticed sooner: torchrun then stops the others
TIMEOUT = timedelta(hours=2)
BUCKET_BYTES = 64 * 2**20  # statistics reduced together in buckets of this size (a larger one alone, in place)
LAUNCH = "torchrun --nproc-per-node N -m grailc compress ..."


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def active() -> bool:
    """A process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def backend() -> str | None:
    """The collective backend ("gloo", "nccl"), None without a process group."""
    return dist.get_backend() if active() else None


def is_main() -> bool:
    """Rank 0, the one process that writes outputs and prints (True without a process group)."""
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT): NCCL when this process computes on a GPU, gloo otherwise. Returns True when it initialised one
    (then ``shutdown`` at the end); False when not launched by torchrun or already initialised."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise GrailcError("WORLD_SIZE > 1 asks for a data-parallel run, but this PyTorch build has no "
                          "torch.distributed", fix="install a PyTorch build with distributed support, or run "
                          "without torchrun")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise RecipeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for a data-parallel run, but "
                          f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set",
                          fix=f"start data-parallel runs with {LAUNCH}, or unset WORLD_SIZE")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except Exception as e:  # a bad address, a port in use, a missing backend: one line
        text = str(e).strip().splitlines()
        raise GrailcError(f"cannot join the torch.distributed process group ({backend}, rank "
                          f"{os.environ['RANK']} of {os.environ['WORLD_SIZE']}): {type(e).__name__}: "
                          f"{text[0][:300] if text else ''}",
                          fix=f"start every process with {LAUNCH} on one machine, or check MASTER_ADDR / "
                          "MASTER_PORT") from e
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list, what: str = "calibration batches") -> list:
    """This process's share of ``items``: those at positions i with i % W == rank (each process at least one)."""
    w = world()
    if w == 1:
        return list(items)
    if len(items) < w:
        raise CalibrationError(
            f"{len(items)} {what} cannot be shared among {w} processes: each process needs at least one",
            fix=f"give at least {w} calibration batches (--calib-batches, or --calib-samples / --batch-size for "
            "hf: models), or start fewer processes (torchrun --nproc-per-node)",
        )
    return list(items[rank() :: w])


def _comm_device() -> torch.device:
    """Where collectives run: the current GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _same_everywhere(value: int) -> bool:
    """Whether every process passed the same int64 ``value`` (one all-reduce of [v, -v] with MIN)."""
    t = torch.tensor([value, -value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    low, high = int(t[0]), -int(t[1])
    return low == value == high


def _digest(parts) -> int:
    """A signed 64-bit fingerprint of a sequence of byte strings."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part)
    return int.from_bytes(h.digest(), "little", signed=True)


def all_reduce_stats(stats: dict) -> dict:
    """Sum every value of ``stats`` over the processes: tensors (any dtype and device; they keep both) and ints.
    Returns ``stats``, holding the sums (a tensor on the collective's device may be summed in place). Every process
    must pass the same keys with the same shapes and dtypes, which is checked first. A no-op in one process."""
    if not active():
        return stats
    keys = sorted(stats, key=repr)
    layout = _digest(f"{k!r}:{_describe(stats[k])};".encode() for k in keys)
    if not _same_everywhere(layout):
        raise GrailcError(
            f"the processes of the data-parallel run hold different statistics to sum (rank {rank()} holds "
            f"{len(keys)})",
            fix="every process must run the same grailc version, model, recipe and flags: start them all with one "
            f"{LAUNCH} command",
        )
    counts = [k for k in keys if not isinstance(stats[k], torch.Tensor)]
    if counts:
        summed = torch.tensor([int(stats[k]) for k in counts], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(summed)
        for k, v in zip(counts, summed.tolist()):
            stats[k] = v
    tensors = sorted((k for k in keys if isinstance(stats[k], torch.Tensor)), key=lambda k: str(stats[k].dtype))
    comm = _comm_device()
    pending: list = []
    size = 0

    def flush():
        nonlocal size
        if len(pending) == 1 and stats[pending[0]].device == comm and stats[pending[0]].is_contiguous():
            dist.all_reduce(stats[pending[0]])
        elif pending:
            flat = torch.cat([stats[k].reshape(-1).to(comm) for k in pending])
            dist.all_reduce(flat)
            for k, piece in zip(pending, flat.split([stats[k].numel() for k in pending])):
                stats[k] = piece.view(stats[k].shape).to(stats[k].device)
        pending.clear()
        size = 0

    for k in tensors:
        t = stats[k]
        if pending and (t.dtype != stats[pending[0]].dtype or size + t.numel() * t.element_size() > BUCKET_BYTES):
            flush()
        pending.append(k)
        size += t.numel() * t.element_size()
    flush()
    return stats


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}{list(value.shape)}"
    return type(value).__name__


def fingerprint(module: torch.nn.Module) -> int:
    """A 64-bit fingerprint of every parameter and buffer of ``module``: names, shapes, dtypes and bytes."""
    parts = []
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        parts.append(f"{name}:{t.dtype}{list(t.shape)};".encode())
        parts.append(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return _digest(parts)


def agree(module: torch.nn.Module, what: str = "compressed weights") -> None:
    """Raise a VerificationError unless every process holds bitwise the same ``module`` (no-op in one process)."""
    if not active():
        return
    if not _same_everywhere(fingerprint(module)):
        raise VerificationError(
            f"the {world()} processes of the data-parallel run computed different {what} from the same summed "
            "statistics (a selection or solve that does not reproduce bitwise across them)",
            fix="run every process on the same kind of machine with the same software (e.g. MKL_CBWR=COMPATIBLE "
            "for MKL), or compile in one process",
        )


def check_recipe(recipe) -> None:
    """Refuse what does not run data-parallel: passes that read the calibration data outside the summed
    statistics and would see only this process's share."""
    if not active():
        return
    fix = f"run it in one process (without torchrun), or drop it from the data-parallel run ({LAUNCH})"
    if recipe.reconstruct != "off" and recipe.selector == "wanda_pp":
        raise RecipeError(
            f"Wanda++'s regional optimisation (--reconstruct {recipe.reconstruct}, which --selector wanda_pp turns "
            f"on for hf: models) is not data-parallel: it trains on the calibration batches, and under torchrun each "
            f"of the {world()} processes holds only its share of them",
            fix="give --reconstruct off to run Wanda++'s selection alone data-parallel, or run in one process")
    if recipe.reconstruct != "off":
        raise RecipeError(
            f"--reconstruct {recipe.reconstruct} is not data-parallel: it trains with Adam on the calibration "
            f"batches, and under torchrun each of the {world()} processes holds only its share of them, so each "
            "would train on different data", fix=fix)
