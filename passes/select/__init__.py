"""Select: decide, per prunable group, its channel map (which units to keep, or how to fold them).

The budget of a group of C units (channels, heads, conv groups) at ratio r is ``max(1, round(C * (1 - r)))``
kept units, rounded so that every kept width is a multiple of ``multiple_of`` (``"auto"``: of 8 in groups at least
64 channels wide, see :func:`resolve_multiple`); a recipe can set the
ratio per module pattern. A global ``budget`` plans the counts instead (see :mod:`.global_budget`). The selector
named in the recipe scores units and the top scores are kept, or it builds the map itself (``fold``).
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch

from grailc.channel_map import ChannelMap
from grailc.context import Decision
from grailc.errors import check_choice
from grailc.passmanager import Pass, register_pass
from grailc.registry import SELECTORS, load_builtin


def ratio_for(group, recipe) -> float:
    for pattern, ratio in recipe.ratios.items():
        if any(fnmatchcase(m, pattern) for m in group.modules()):
            return ratio
    return recipe.ratio


def n_keep(size: int, ratio: float, step: int = 1) -> int:
    """Units kept of ``size`` at ``ratio``, a multiple of ``step`` (at least one step) unless that is all of them."""
    k = max(1, min(size, round(size * (1.0 - ratio))))
    if step > 1 and k < size:
        k = min(size, max(step, step * round(k / step)))
    return k


AUTO_MULTIPLE = 8  # multiple_of "auto": ONNX Runtime's CPU convolutions work in blocks of 8 (AVX2) or 16 channels
AUTO_MIN_WIDTH = 64  # ... in groups at least this wide (rounding moves a kept width by at most 4 channels)


def resolve_multiple(multiple_of: int | str, width: int) -> int:
    """The multiple for a group of ``width`` channels: ``multiple_of`` itself, or for ``"auto"`` AUTO_MULTIPLE where
    the group is at least AUTO_MIN_WIDTH wide (exact widths in narrower groups, where a step of 8 is coarse)."""
    if multiple_of == "auto":
        return AUTO_MULTIPLE if width >= AUTO_MIN_WIDTH else 1
    return int(multiple_of)


def unit_step(group, multiple_of: int | str) -> int:
    """Units per step so that every kept width (units * channels per unit) is a multiple of ``multiple_of``
    (resolved for the group's width, see :func:`resolve_multiple`)."""
    m = resolve_multiple(multiple_of, group.size * group.granule)
    return m // math.gcd(m, group.granule) if m > 1 else 1


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending (ties broken by index, deterministically)."""
    order = torch.argsort(scores.to(torch.float64), descending=True, stable=True)
    return torch.sort(order[:k]).values


def units_kept(ctx, group) -> int:
    """Units the group keeps: planned by the global budget, or by the group's ratio."""
    if group.id in ctx.planned:
        return ctx.planned[group.id]
    return n_keep(group.size, ratio_for(group, ctx.recipe), unit_step(group, ctx.recipe.multiple_of))


def select_group(ctx, group) -> None:
    """Record the decision for one group (none when its budget keeps every channel)."""
    load_builtin()
    check_choice("selector", ctx.recipe.selector, SELECTORS)
    k = units_kept(ctx, group)
    if k < group.size:
        found = SELECTORS[ctx.recipe.selector](ctx, group)
        if isinstance(found, ChannelMap):
            ctx.decisions[group.id] = Decision(found)
        else:
            ctx.decisions[group.id] = Decision(ChannelMap.select(top_k(found, k), group.size), found)


@register_pass
class Select(Pass):
    """Decide every prunable group not decided yet (sequential calibration decides as it goes)."""

    name = "select"
    requires = ("deps",)

    def run(self, ctx) -> None:
        if ctx.recipe.budget and not ctx.recipe.sequential:  # sequential calibration plans before it starts
            from grailc.passes.select.global_budget import plan

            ctx.planned = plan(ctx, {key: torch.diagonal(G) for key, G in ctx.grams.items()})
        for g in ctx.deps.prunable():
            if g.id not in ctx.done:
                select_group(ctx, g)
