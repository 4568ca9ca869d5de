"""Compensate: for every consumer slot of a pruned group, choose the map B merged into the consumer.

A compensator approximates the input as x ~ B z' + c from the k new channels z' = R z of the group's channel map
(z_K for a selection; B merged into the weight, c into the bias). The reconstruction error of a consumer with
columns M (one row per output channel and kernel tap) is

    e(B, c) = ||M (x - B z' - c)||^2 / ||M x||^2 = <E, H> / <Gx, H>,   H = M^T M,  C_K = C R^T
    E = Gx - C_K B^T - B C_K^T + B (R Gz R^T) B^T - r c^T - c r^T + n c c^T,   r = sx - B R sz

summed over all n calibration positions (exact for 1x1 convs and linear layers, per tap for wider kernels). Here x
is the dense input and z the input the compressed model sees: z = x (Gx = C = Gz = G, sx = sz = s) unless
calibration ran sequentially.
Plain pruning is B = U (I[:, K] for a selection), c = 0. A compensation whose error exceeds plain pruning's is
refused for that slot.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from grailc.channel_map import ChannelMap
from grailc.context import Fold, SlotStats
from grailc.errors import check_choice
from grailc.passmanager import Pass, register_pass
from grailc.registry import COMPENSATORS, compensator, load_builtin
from grailc.surgery import consumer_columns, get_param, takes_bias


def recon_error(stats: SlotStats, H: torch.Tensor, B: torch.Tensor | None, cmap: ChannelMap,
                c: torch.Tensor | None = None) -> float:
    """<E, H> / <Gx, H> with E as in the module docstring and H = M^T M ([size, size], formed once per slot), at
    size^2 k per call: <E, H> = <Gx, H> - 2 <H B, C_K> + <B^T H B, R Gz R^T> - 2 r^T H c + n c^T H c.
    ``B`` None is plain pruning, B = U, read by indexing for a selection (no products)."""
    if B is None:
        HB = cmap.spread_cols(H)
        BtHB = cmap.spread_cols(HB.T).T
        B = cmap.U() if c is not None else None
    else:
        B = B.to(torch.float64)
        HB = H @ B
        BtHB = B.T @ HB
    num = -2 * (HB * cmap.cols(stats.C)).sum() + (BtHB * cmap.gram(stats.Gz)).sum()
    if c is not None:
        r = stats.sx - B @ cmap.vec(stats.sz)
        Hc = H @ c.to(torch.float64)
        num = num - 2 * (r @ Hc) + stats.rows * (c.to(torch.float64) @ Hc)
    den = (stats.Gx * H).sum()
    return float((den + num) / den) if den > 0 else 0.0


def slot_stats(ctx, slot) -> SlotStats:
    """The slot's statistics; the sums only where the consumer can take a bias."""
    G = ctx.grams[slot.key]
    sz = ctx.sums.get(slot.key) if takes_bias(ctx.gm, slot.consumer) else None
    sx = ctx.target_sums.get(slot.key, sz) if sz is not None else None
    return SlotStats(G, ctx.cross.get(slot.key, G), ctx.target_grams.get(slot.key, G), sz, sx, ctx.rows[slot.key])


@compensator("none")
def no_compensation(stats, cmap, lam):
    return None, None, None


def compensate_group(ctx, group) -> None:
    """Choose B for every consumer slot of one decided group, refusing maps worse than plain pruning."""
    load_builtin()
    check_choice("compensator", ctx.recipe.compensate, COMPENSATORS)
    solve = COMPENSATORS[ctx.recipe.compensate]
    decision = ctx.decisions.get(group.id)
    if decision is None:
        return
    for slot in group.consumers:
        cmap = slot.map(decision.map)
        stats = slot_stats(ctx, slot)
        m = consumer_columns(get_param(ctx.gm, slot.consumer.weight), slot, torch.float64)
        H = m.T @ m
        fold = Fold(None, recon_error_plain=recon_error(stats, H, None, cmap))
        B, c, fallback = solve(stats, cmap, ctx.recipe.lam)
        if B is not None or c is not None:
            err = recon_error(stats, H, B, cmap, c)
            fold.recon_error_grail, fold.fallback = err, fallback
            finite = all(t is None or bool(torch.isfinite(t).all()) for t in (B, c))
            if err > fold.recon_error_plain * (1 + 1e-9) + 1e-12 or not finite:
                fold.refused = True
            else:
                fold.B, fold.offset = B, c
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
