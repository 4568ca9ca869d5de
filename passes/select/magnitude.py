"""Magnitude selection: score_c = sum over producers p of ||W_p[c]||_q (q = 1 or 2, the recipe's
``magnitude_norm``); the rows of every producer of a residual group count."""

from __future__ import annotations

import torch

from grailc.registry import selector
from grailc.surgery import get_param


@selector("magnitude")
def magnitude(ctx, group) -> torch.Tensor:
    q = ctx.recipe.magnitude_norm
    score = torch.zeros(group.size, dtype=torch.float64)
    for p in group.producers:
        w = get_param(ctx.gm, p.weight).detach().to(torch.float64)
        score += w.reshape(w.shape[0], -1).norm(p=q, dim=1)
    return score
