"""Random selection, the floor every selector is measured against: score_u ~ U(0, 1), so the kept units are a
uniformly random subset. Deterministic: group g draws from a generator seeded with ``seed * 1000003 + g`` where
``seed`` is the recipe's ``calib.seed`` (``--seed``)."""

from __future__ import annotations

import torch

from grailc.registry import selector


@selector("random")
def random_units(ctx, group) -> torch.Tensor:
    generator = torch.Generator().manual_seed(ctx.recipe.calib.seed * 1000003 + group.id)
    return torch.rand(group.size, generator=generator, dtype=torch.float64)
