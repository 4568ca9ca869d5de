"""Magnitude selection: score_u = sum over producers p and channels c of unit u of ||W_p[c]||_q (q = 1 or 2,
the recipe's ``magnitude_norm``); the rows of every producer of a residual group count."""

from __future__ import annotations

import torch

from grailc.registry import selector
from grailc.surgery import get_param


@selector("magnitude")
def magnitude(ctx, group) -> torch.Tensor:
    q = ctx.recipe.magnitude_norm
    score = torch.zeros(group.size, dtype=torch.float64)
    for slot in group.producers:
        w = get_param(ctx.gm, slot.fact.weight).detach().to("cpu", torch.float64).movedim(slot.fact.dim, 0)
        rows = slot.take(w, 0)
        score += slot.to_units(rows.reshape(rows.shape[0], -1).norm(p=q, dim=1))
    return score
