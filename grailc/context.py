"""The object handed from pass to pass: the graph, its analyses and every intermediate result.

Nothing lives in globals. Analyses (``deps``) are dropped when a pass that does not preserve them changes the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from grailc.channel_map import ChannelMap
from grailc.groups import Dependencies


@dataclass
class Decision:
    """What a selector decided for one group: the channel map of its units (channels, heads, conv groups; kept, or
    merged by a fold) and the per-unit scores behind it (None for a fold)."""

    map: ChannelMap
    scores: torch.Tensor | None = None


@dataclass
class Fold:
    """What a compensator decided for one consumer slot: the input is approximated as x ~ B z + c (z the k new
    channels), so the consumer becomes W' = W B (``B`` [size, k]; None: the map's plain spread W U, which is W[:, K]
    for a selection) and b' = b + W c (``offset`` c [size]; None: no bias change). ``columns``: solved over kernel
    taps, in the consumer's output space (``grailc.passes.taps``): B is the slot's new columns W' [O, k * taps]
    and c the bias shift [O]."""

    B: torch.Tensor | None
    offset: torch.Tensor | None = None
    recon_error_plain: float | None = None
    recon_error_grail: float | None = None
    fallback: str | None = None  # "lstsq" when the ridge system could not be factorised
    columns: bool = False  # B, c are the new columns and the bias shift themselves (solved over kernel taps)
    refused: bool = False  # compensation was worse than plain pruning, so plain pruning was kept


@dataclass
class SlotStats:
    """What a compensator sees of one consumer slot, over ``rows`` positions: the model sees z, the target is the
    dense input x (z = x unless calibration ran sequentially). ``sz``/``sx`` are None when the consumer cannot
    take a bias (then no offset is possible)."""

    Gz: torch.Tensor  # sum z z^T
    C: torch.Tensor  # sum x z^T
    Gx: torch.Tensor  # sum x x^T
    sz: torch.Tensor | None  # sum z
    sx: torch.Tensor | None  # sum x
    rows: int


@dataclass
class TapStats:
    """A k x k convolution consumer's statistics over its kept (channel, tap) pairs against its dense output
    (``grailc.passes.taps``): all rows and the error sample, as a compensator and the reported errors read them,
    and the map they are solved with (an ``OutputMap``)."""

    stats: SlotStats
    sample: SlotStats
    map: Any


@dataclass
class Context:
    gm: fx.GraphModule
    reference: fx.GraphModule  # the original graph, never modified
    example: tuple[torch.Tensor, ...]  # inputs are always a tuple, one tensor per model input
    recipe: Any
    calib: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    held_out: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    # what sequential calibration's dense run is fed instead of ``calib`` (one batch each; None: ``calib``)
    dense_calib: list[tuple[torch.Tensor, ...]] | None = None
    data_free: bool = False
    deps: Dependencies | None = None
    grams: dict[str, torch.Tensor] = field(default_factory=dict)  # consumer slot key -> G (float64)
    # sequential calibration only: C = sum x z^T (dense x, compressed z); absent: G. error_sample: the statistics,
    # Gx = sum x x^T included, of a sample of the rows, which the reported errors are estimated from (absent: all
    # rows, Gx = C = G)
    cross: dict[str, torch.Tensor] = field(default_factory=dict)
    error_sample: dict[str, SlotStats] = field(default_factory=dict)
    taps: dict[str, TapStats] = field(default_factory=dict)  # consumer slot key -> its statistics over taps
    rows: dict[str, int] = field(default_factory=dict)  # consumer slot key -> positions behind its Gram
    # consumer slot key -> s = sum x (float64, [size]) of the input the model sees (z in sequential calibration), so
    # ctx.sums[key] / ctx.rows[key] is the per-channel input mean; target_sums: sequential only, the dense x
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    target_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    planned: dict[int, int] = field(default_factory=dict)  # group id -> units kept, under a global budget
    decisions: dict[int, Decision] = field(default_factory=dict)  # group id -> decision
    folds: dict[str, Fold] = field(default_factory=dict)  # consumer slot key -> fold
    done: set[int] = field(default_factory=set)  # groups decided and compensated during sequential calibration
    applied_deps: Dependencies | None = None  # the analysis the rewrite was made from
    report: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    progress: bool = True
    cache: dict[str, Any] = field(default_factory=dict)  # per-compile caches of passes (wanda_pp's gradients)
