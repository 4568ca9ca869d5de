"""FLAP's fluctuation metric (WIFV): how much the consumer's output would move if channel c were replaced by its
mean,

    score_c = Var(x_c) * ||W[:, c]||^2,     Var(x_c) = G_cc / n - (s_c / n)^2

(G the consumer's input Gram, s the input sum, n the calibration rows). A channel whose input barely fluctuates is
almost a constant, which a bias absorbs: FLAP pairs this score with the ``bias`` compensator (FLAP proper) and
GRAIL with ``grail`` or ``grail+bias``. Scores are normalised per consumer; a unit (a head) scores the mean of
its channels, as FLAP averages a head's channel scores.
"""

from __future__ import annotations

import torch

from grailc.registry import selector
from grailc.surgery import consumer_columns, get_param


def fluctuation(ctx, slot) -> torch.Tensor:
    """Var(x_c) * ||W[:, c]||^2 per channel of one consumer slot."""
    n = max(1, ctx.rows.get(slot.key, 1))
    mean = ctx.sums[slot.key] / n
    var = (torch.diagonal(ctx.grams[slot.key]) / n - mean * mean).clamp_min(0)
    w = consumer_columns(get_param(ctx.gm, slot.consumer.weight), slot, torch.float32)
    return var * w.to(torch.float64).pow(2).sum(0)


@selector("flap")
def flap(ctx, group) -> torch.Tensor:
    score = torch.zeros(group.size, dtype=torch.float64)
    for slot in group.consumers:
        s = slot.to_units(fluctuation(ctx, slot))
        score += s / s.sum().clamp_min(1e-300)
    return score
