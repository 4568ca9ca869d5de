"""Structured Wanda: score_c = sum over consumers of sum_{o, taps} |W[o, c, taps]| * ||x_c||_2.

``||x_c||_2 = sqrt(G_cc)`` comes from each consumer's own Gram, so a channel that a consumer weighs heavily and
sees with large activations is kept. Scores are normalised per consumer (divided by their sum) so that wide and
narrow consumers of a residual group count alike; a unit (a head) scores the sum of its channels.

``wanda_sp`` is the same score under the name of the structured-LLM baseline (Wanda-SP: |W| * ||x|| of the down /
output projection's columns, summed over its rows and over a head's channels), so LLM recipes read as published.
"""

from __future__ import annotations

import torch

from grailc.registry import selector
from grailc.surgery import consumer_columns, get_param


@selector("wanda_sp")
@selector("wanda")
def wanda(ctx, group) -> torch.Tensor:
    return wanda_scores(ctx, group, lambda slot: torch.diagonal(ctx.grams[slot.key]))


def wanda_scores(ctx, group, sq_norms) -> torch.Tensor:
    """The scores from ``sq_norms(slot)``, the per-channel sum x^2 of the slot's input."""
    score = torch.zeros(group.size, dtype=torch.float64)
    for slot in group.consumers:
        w = consumer_columns(get_param(ctx.gm, slot.consumer.weight), slot, torch.float32)
        norms = sq_norms(slot).clamp_min(0).sqrt()
        s = slot.to_units(w.abs().sum(0, dtype=torch.float64) * norms)
        score += s / s.sum().clamp_min(1e-300)
    return score
