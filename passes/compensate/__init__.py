"""Compensate: for every consumer slot of a pruned group, choose the map B merged into the consumer.

The reconstruction error of a consumer with columns M (one row per output channel and kernel tap) is

    e(B) = ||M (x - B x_K)||^2 / ||M x||^2 = <D G D^T, H> / <G, H>,   D = I - B S_K,  H = M^T M

summed over all calibration positions (exact for 1x1 convs and linear layers, per tap for wider kernels).
Plain pruning is B = I[:, K]. A compensation whose error exceeds plain pruning's is refused for that slot.
"""

from __future__ import annotations

import torch

from grailc.context import Fold
from grailc.errors import check_choice
from grailc.passmanager import Pass, register_pass
from grailc.registry import COMPENSATORS, compensator, load_builtin
from grailc.surgery import consumer_columns, get_param, selection


def recon_error(G: torch.Tensor, H: torch.Tensor, B: torch.Tensor, keep: torch.Tensor) -> float:
    """<D G D^T, H> / <G, H> with D = I - B S_K."""
    size = G.shape[0]
    D = torch.eye(size, dtype=torch.float64)
    D[:, keep] -= B
    num = ((D @ G @ D.T) * H).sum()
    den = (G * H).sum()
    return float(num / den) if den > 0 else 0.0


@compensator("none")
def no_compensation(G, keep, lam):
    return None, None


@register_pass
class Compensate(Pass):
    name = "compensate"
    requires = ("deps",)

    def run(self, ctx) -> None:
        load_builtin()
        recipe = ctx.recipe
        check_choice("compensator", recipe.compensate, COMPENSATORS)
        solve = COMPENSATORS[recipe.compensate]
        ctx.folds = {}
        for g in ctx.deps.prunable():
            decision = ctx.decisions.get(g.id)
            if decision is None:
                continue
            keep = decision.keep
            for slot in g.consumers:
                G = ctx.grams[slot.key]
                m = consumer_columns(get_param(ctx.gm, slot.consumer.weight), slot, torch.float32)
                H = (m.T @ m).to(torch.float64)
                plain = selection(slot.size, keep)
                fold = Fold(None, recon_error_plain=recon_error(G, H, plain, keep))
                B, fallback = solve(G, keep, recipe.lam)
                if B is not None:
                    err = recon_error(G, H, B, keep)
                    fold.recon_error_grail, fold.fallback = err, fallback
                    if err > fold.recon_error_plain * (1 + 1e-9) + 1e-12 or not torch.isfinite(B).all():
                        fold.refused = True
                    else:
                        fold.B = B
                ctx.folds[slot.key] = fold
