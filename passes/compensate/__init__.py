"""Compensate: for every consumer slot of a pruned group, choose the map B merged into the consumer.

The reconstruction error of a consumer with columns M (one row per output channel and kernel tap) is

    e(B) = ||M (x - B z_K)||^2 / ||M x||^2
         = <Gx - C_K B^T - B C_K^T + B Gz[K, K] B^T, H> / <Gx, H>,   H = M^T M,  C_K = C[:, K]

summed over all calibration positions (exact for 1x1 convs and linear layers, per tap for wider kernels). Here x
is the dense input and z the input the compressed model sees: z = x (Gx = C = Gz = G) unless calibration ran
sequentially.
Plain pruning is B = I[:, K]. A compensation whose error exceeds plain pruning's is refused for that slot.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from grailc.context import Fold
from grailc.errors import check_choice
from grailc.passmanager import Pass, register_pass
from grailc.registry import COMPENSATORS, compensator, load_builtin
from grailc.surgery import consumer_columns, get_param, selection


def recon_error(Gx, C, Gz, H, B: torch.Tensor, keep: torch.Tensor) -> float:
    """<Gx - C_K B^T - B C_K^T + B Gz[K, K] B^T, H> / <Gx, H>."""
    ck = C[:, keep]
    E = Gx - ck @ B.T - B @ ck.T + B @ Gz[keep][:, keep] @ B.T
    den = (Gx * H).sum()
    return float((E * H).sum() / den) if den > 0 else 0.0


@compensator("none")
def no_compensation(G, keep, lam, cross=None):
    return None, None


def compensate_group(ctx, group) -> None:
    """Choose B for every consumer slot of one decided group, refusing maps worse than plain pruning."""
    load_builtin()
    check_choice("compensator", ctx.recipe.compensate, COMPENSATORS)
    solve = COMPENSATORS[ctx.recipe.compensate]
    decision = ctx.decisions.get(group.id)
    if decision is None:
        return
    for slot in group.consumers:
        keep = slot.keep(decision.keep)
        G = ctx.grams[slot.key]
        C, Gx = ctx.cross.get(slot.key, G), ctx.target_grams.get(slot.key, G)
        m = consumer_columns(get_param(ctx.gm, slot.consumer.weight), slot, torch.float32)
        H = (m.T @ m).to(torch.float64)
        fold = Fold(None, recon_error_plain=recon_error(Gx, C, G, H, selection(slot.size, keep), keep))
        B, fallback = solve(G, keep, ctx.recipe.lam, cross=ctx.cross.get(slot.key))
        if B is not None:
            fold.recon_error_grail, fold.fallback = recon_error(Gx, C, G, H, B, keep), fallback
            if fold.recon_error_grail > fold.recon_error_plain * (1 + 1e-9) + 1e-12 or not torch.isfinite(B).all():
                fold.refused = True
            else:
                fold.B = B
        ctx.folds[slot.key] = fold


@register_pass
class Compensate(Pass):
    """Compensate every decided group not handled yet (sequential calibration compensates as it goes)."""

    name = "compensate"
    requires = ("deps",)

    def run(self, ctx) -> None:
        todo = [g for g in ctx.deps.prunable() if g.id not in ctx.done and g.id in ctx.decisions]
        for g in tqdm(todo, desc="solve", unit="group", disable=not ctx.progress, leave=False):
            compensate_group(ctx, g)
