"""The object handed from pass to pass: the graph, its analyses and every intermediate result.

Nothing lives in globals. Analyses (``deps``) are dropped when a pass that does not preserve them changes the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from grailc.groups import Dependencies


@dataclass
class Decision:
    """What a selector decided for one group: the kept units (channels, heads, conv groups; sorted, or permuted by
    the self-check) and the per-unit scores behind them."""

    keep: torch.Tensor
    scores: torch.Tensor | None = None


@dataclass
class Fold:
    """What a compensator decided for one consumer slot: the map B ([size, k]) merged into the consumer."""

    B: torch.Tensor | None
    recon_error_plain: float | None = None
    recon_error_grail: float | None = None
    fallback: str | None = None  # "lstsq" when the ridge system could not be factorised
    refused: bool = False  # compensation was worse than plain pruning, so plain pruning was kept


@dataclass
class Context:
    gm: fx.GraphModule
    reference: fx.GraphModule  # the original graph, never modified
    example: torch.Tensor
    recipe: Any
    calib: list[torch.Tensor] = field(default_factory=list)
    held_out: list[torch.Tensor] = field(default_factory=list)
    data_free: bool = False
    deps: Dependencies | None = None
    grams: dict[str, torch.Tensor] = field(default_factory=dict)  # consumer slot key -> G (float64)
    # sequential calibration only: C = sum x z^T (dense x, compressed z) and Gx = sum x x^T; absent: both are G
    cross: dict[str, torch.Tensor] = field(default_factory=dict)
    target_grams: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)  # consumer slot key -> positions behind its Gram
    decisions: dict[int, Decision] = field(default_factory=dict)  # group id -> decision
    folds: dict[str, Fold] = field(default_factory=dict)  # consumer slot key -> fold
    done: set[int] = field(default_factory=set)  # groups decided and compensated during sequential calibration
    applied_deps: Dependencies | None = None  # the analysis the rewrite was made from
    report: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    progress: bool = True
