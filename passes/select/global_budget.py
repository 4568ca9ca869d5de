"""Global budget: one parameter or MAC target for the whole model (``budget = "params=0.5"``: remove half of the
model's parameters), spread across the prunable groups by score instead of one ratio everywhere.

Ranking: every unit of every group gets its structured-Wanda score (|W| of the consumers times ||x||, from the
dense statistics), divided by its group's mean score, so that a unit's score says how much it matters relative to
its group. A threshold t keeps, in each group, the units scoring at least t: at least ``budget_floor`` of the group
(and whole steps of ``multiple_of``); groups matching a ``ratios`` pattern keep their fixed ratio. The smallest t
that meets the target is found by bisection on an exact cost model:

    cost(k) = sum over parameters p of numel(p) * prod over the narrowed dims d of p of (kept_d / size_d)
              [* positions(p) for MACs: the output positions per sample of the conv/linear that reads p]

which counts every narrowed row, column and carrier slice (a conv narrowed on both its dims counts both).
MACs count convolutions and linear layers (attention's matmuls scale with the heads but are not in the model).
The selector named in the recipe then chooses the kept units of each group at its planned count.
"""

from __future__ import annotations

import math

import torch

from grailc.channel_map import ChannelMap
from grailc.context import Decision
from grailc.errors import RecipeError
from grailc.metrics import CONVS
from grailc.surgery import get_param, layout_map

CONV_OR_LINEAR = CONVS | {torch.ops.aten.linear.default}  # the ops grailc's MAC counter counts by their weight


def parse_budget(text: str) -> tuple[str, float]:
    """'params=0.5' -> ('params', 0.5): the fraction of the model's parameters (or MACs) to remove."""
    kind, _, value = str(text).partition("=")
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if kind.strip() not in ("params", "macs") or not 0.0 < fraction < 1.0:
        raise RecipeError(f"cannot read the budget {text!r}",
                          fix="write it like params=0.5 or macs=0.3: the fraction of the model's parameters or "
                          "MACs to remove, in (0, 1)")
    return kind.strip(), fraction


class CostModel:
    """Parameters (or MACs) of the model as a function of the units each group keeps."""

    def __init__(self, gm, deps, kind: str):
        self.deps = deps
        dims: dict[str, dict[int, object]] = {}  # parameter target -> {dim: layout}
        for p in deps.producers:
            dims.setdefault(p.weight, {})[p.dim] = p.layout
            if p.bias:
                dims.setdefault(p.bias, {})[0] = p.layout
        for c in deps.consumers:
            dims.setdefault(c.weight, {})[c.dim] = c.layout
        for car in deps.carriers:
            for target, dim in car.params:
                dims.setdefault(target, {})[dim] = car.layout
        weights = {name: p.numel() for name, p in gm.named_parameters()}
        if kind == "macs":
            weights = {target: weights.get(target, 0) * positions for target, positions in _positions(gm).items()}
        self.fixed = sum(n for target, n in weights.items() if target not in dims)
        self.narrowed = [(weights[t], list(d.values())) for t, d in dims.items() if weights.get(t)]
        self.total = self.fixed + sum(n for n, _ in self.narrowed)

    def cost(self, kept: dict[int, int], sizes: dict[int, int]) -> float:
        decisions = {g: Decision(ChannelMap.select(torch.arange(k), sizes[g])) for g, k in kept.items()}
        maps_of = self.deps.maps_of(decisions)
        after = self.fixed
        for n, layouts in self.narrowed:
            after += n * math.prod(layout_map(lay, maps_of).k / lay.length for lay in layouts)
        return after


def _positions(gm) -> dict[str, float]:
    """Weight target -> output positions per sample of the conv/linear node that reads it (MACs = numel * that)."""
    found = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in CONV_OR_LINEAR or len(n.args) < 2:
            continue
        weight, out = n.args[1], n.meta.get("val")
        if getattr(weight, "op", None) != "get_attr" or not isinstance(out, torch.Tensor) or out.dim() < 1:
            continue
        out_channels = get_param(gm, weight.target).shape[0]
        batch = out.shape[0] if out.dim() > 1 else 1
        found[weight.target] = found.get(weight.target, 0) + out.numel() / out_channels / max(1, batch)
    return found


def relative_scores(ctx, group, sq_norms: dict) -> torch.Tensor:
    """Structured Wanda scores of the group's units, divided by their mean."""
    from grailc.passes.select.wanda import wanda_scores

    s = wanda_scores(ctx, group, lambda slot: sq_norms[slot.key])
    return s / s.mean().clamp_min(1e-300)


def plan(ctx, sq_norms: dict) -> dict[int, int]:
    """Group id -> units kept, meeting the recipe's budget; raises when even the floors cannot meet it.
    ``sq_norms``: consumer slot key -> sum x^2 per channel of the dense model (the diagonal of its Gram)."""
    from grailc.passes.select import n_keep, ratio_for, unit_step

    kind, fraction = parse_budget(ctx.recipe.budget)
    groups = ctx.deps.prunable()
    sizes = {g.id: g.size for g in groups}
    fixed = {g.id: n_keep(g.size, ratio_for(g, ctx.recipe), unit_step(g, ctx.recipe.multiple_of))
             for g in groups if _overridden(ctx, g)}
    free = [g for g in groups if g.id not in fixed]
    ranked = {g.id: torch.sort(relative_scores(ctx, g, sq_norms), descending=True).values for g in free}
    steps = {g.id: unit_step(g, ctx.recipe.multiple_of) for g in free}
    floors = {g.id: n_keep(g.size, 1.0 - ctx.recipe.budget_floor, steps[g.id]) for g in free}
    model = CostModel(ctx.gm, ctx.deps, kind)
    target = (1.0 - fraction) * model.total

    def kept_at(t: float) -> dict[int, int]:
        kept = dict(fixed)
        for g in free:
            k = int((ranked[g.id] >= t).sum())
            step = steps[g.id]
            k = min(g.size, step * math.ceil(k / step)) if step > 1 else k
            kept[g.id] = max(floors[g.id], k)
        return kept

    lowest = model.cost(kept_at(math.inf), sizes)
    if lowest > target:
        raise RecipeError(
            f"the budget {ctx.recipe.budget} cannot be met: at the floor of {ctx.recipe.budget_floor:g} per group the "
            f"model keeps {lowest / model.total:.1%} of its {kind} (the target is {1 - fraction:.1%}; pinned groups, "
            "embeddings and classifiers are not pruned)",
            fix="ask for less (a smaller fraction), lower budget_floor, or prune more targets (--targets)",
        )
    lo, hi = 0.0, max((float(r[0]) for r in ranked.values()), default=0.0) + 1.0  # cost(lo) > target >= cost(hi)
    if model.cost(kept_at(lo), sizes) <= target:
        return kept_at(lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        if model.cost(kept_at(mid), sizes) <= target:
            hi = mid
        else:
            lo = mid
    return kept_at(hi)


def _overridden(ctx, group) -> bool:
    """Whether a ``ratios`` pattern names one of the group's modules (its ratio is then fixed)."""
    from fnmatch import fnmatchcase

    return any(fnmatchcase(m, pattern) for pattern in ctx.recipe.ratios for m in group.modules())
