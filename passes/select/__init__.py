"""Select: decide, per prunable group, which channels to keep.

The budget of a group of size C at ratio r is ``max(1, round(C * (1 - r)))`` kept channels; a recipe can set the
ratio per module pattern. The selector named in the recipe scores channels; the top scores are kept.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from grailc.context import Decision
from grailc.errors import check_choice
from grailc.passmanager import Pass, register_pass
from grailc.registry import SELECTORS, load_builtin


def ratio_for(group, recipe) -> float:
    for pattern, ratio in recipe.ratios.items():
        if any(fnmatchcase(m, pattern) for m in group.modules()):
            return ratio
    return recipe.ratio


def n_keep(size: int, ratio: float) -> int:
    return max(1, min(size, round(size * (1.0 - ratio))))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending (ties broken by index, deterministically)."""
    order = torch.argsort(scores.to(torch.float64), descending=True, stable=True)
    return torch.sort(order[:k]).values


@register_pass
class Select(Pass):
    name = "select"
    requires = ("deps",)

    def run(self, ctx) -> None:
        load_builtin()
        recipe = ctx.recipe
        check_choice("selector", recipe.selector, SELECTORS)
        score = SELECTORS[recipe.selector]
        ctx.decisions = {}
        for g in ctx.deps.prunable():
            k = n_keep(g.size, ratio_for(g, recipe))
            if k == g.size:
                continue
            scores = score(ctx, g)
            ctx.decisions[g.id] = Decision(top_k(scores, k), scores)
