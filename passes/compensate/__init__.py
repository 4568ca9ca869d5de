"""Compensate: for every consumer slot of a pruned group, choose the map B merged into the consumer.

A compensator approximates the input as x ~ B z' + c from the k new channels z' = R z of the group's channel map
(z_K for a selection; B merged into the weight, c into the bias). The reconstruction error of a consumer with
columns M (one row per output channel and kernel tap) is

    e(B, c) = ||M (x - B z' - c)||^2 / ||M x||^2 = <E, H> / <Gx, H>,   H = M^T M,  C_K = C R^T
    E = Gx - C_K B^T - B C_K^T + B (R Gz R^T) B^T - r c^T - c r^T + n c c^T,   r = sx - B R sz

summed over all n calibration positions (exact for 1x1 convs and linear layers, per tap for wider kernels). Here x
is the dense input and z the input the compressed model sees: z = x (Gx = C = Gz = G, sx = sz = s) unless
calibration ran sequentially. A k x k convolution solved over its taps (``ctx.taps``, :mod:`grailc.passes.taps`)
runs the same solve in its output space: x is its dense output, z its kept patches, M = I and B its new columns.
Plain pruning is B = U (I[:, K] for a selection), c = 0. A compensation whose error exceeds plain pruning's is
refused for that slot; the comparison reads all rows (the difference of two errors has no Gx term). After
sequential calibration the *reported* errors are estimated from the statistics of a sample of the rows
(``ctx.error_sample``: Gx, C, Gz and the sums of the same rows), so that each is the norm of an actual residual.
"""

from __future__ import annotations

import dataclasses

import torch
from tqdm import tqdm

from grailc.channel_map import ChannelMap
from grailc.context import Fold, SlotStats
from grailc.errors import check_choice
from grailc.passmanager import Pass, register_pass
from grailc.registry import COMPENSATORS, compensator, load_builtin
from grailc.surgery import consumer_columns, get_param, takes_bias


def error_terms(H: torch.Tensor | None, B: torch.Tensor | None, cmap: ChannelMap, c: torch.Tensor | None,
                *stats: SlotStats) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per statistics given, (<E, H> - <Gx, H>, <Gx, H>) with E as in the module docstring and H = M^T M
    ([size, size], formed once per slot; None: the identity, as in the output space): <E, H> - <Gx, H> =
    -2 <H B, C_K> + <B^T H B, R Gz R^T> - 2 r^T H c + n c^T H c, which has no Gx term (two maps are compared by it
    alone); the second term None where ``Gx`` is. H B and B^T H B are formed once for all (size^2 k). ``B`` None is
    plain pruning, B = U, read by indexing for a selection (no products)."""
    if B is None:
        HB = cmap.U() if H is None else cmap.spread_cols(H)
        BtHB = cmap.spread_cols(HB.T).T
        B = cmap.U() if c is not None else None
    else:
        B = B.to(torch.float64)
        HB = B if H is None else H @ B
        BtHB = B.T @ HB
    Hc = None if c is None else c.to(torch.float64) if H is None else H @ c.to(torch.float64)
    found = []
    for st in stats:
        num = -2 * (HB * cmap.cols(st.C)).sum() + (BtHB * cmap.gram(st.Gz)).sum()
        if c is not None:
            r = st.sx - B @ cmap.vec(st.sz)
            num = num - 2 * (r @ Hc) + st.rows * (c.to(torch.float64) @ Hc)
        den = None if st.Gx is None else torch.diagonal(st.Gx).sum() if H is None else (st.Gx * H).sum()
        found.append((num, den))
    return found


def as_error(num: torch.Tensor, den: torch.Tensor) -> float:
    """<E, H> / <Gx, H> from ``error_terms``' pair (0 where the consumer reads nothing of the input)."""
    return float((den + num) / den) if den > 0 else 0.0


def recon_error(stats: SlotStats, H: torch.Tensor, B: torch.Tensor | None, cmap: ChannelMap,
                c: torch.Tensor | None = None) -> float:
    """<E, H> / <Gx, H> (``error_terms``)."""
    return as_error(*error_terms(H, B, cmap, c, stats)[0])


def slot_stats(ctx, slot) -> SlotStats:
    """The slot's statistics over all rows (Gx None after sequential calibration, which forms it only for the
    error sample); the sums only where the consumer can take a bias."""
    G = ctx.grams[slot.key]
    sz = ctx.sums.get(slot.key) if takes_bias(ctx.gm, slot.consumer) else None
    sx = ctx.target_sums.get(slot.key, sz) if sz is not None else None
    sequential = slot.key in ctx.cross
    return SlotStats(G, ctx.cross.get(slot.key, G), None if sequential else G, sz, sx, ctx.rows[slot.key])


def error_stats(ctx, slot, stats: SlotStats) -> SlotStats:
    """The statistics the slot's reported errors come from: the error sample of sequential calibration, else
    ``stats`` (all rows)."""
    sample = ctx.error_sample.get(slot.key)
    if sample is None:
        return stats
    return sample if stats.sz is not None else dataclasses.replace(sample, sz=None, sx=None)


def taps_stats(ctx, slot, taps) -> tuple[SlotStats, SlotStats]:
    """A slot's statistics over kernel taps (all rows, error sample), the sums only where it can take a bias."""
    if takes_bias(ctx.gm, slot.consumer):
        return taps.stats, taps.sample
    return tuple(dataclasses.replace(s, sz=None, sx=None) for s in (taps.stats, taps.sample))


@compensator("none")
def no_compensation(stats, cmap, lam):
    return None, None, None


def worse_than_plain(plain: tuple, ours: tuple, reported: tuple, rows: int, reported_rows: int) -> bool:
    """Whether a map reconstructs worse than plain pruning on all rows: the ``error_terms`` numerators of all
    rows compared (``plain``, ``ours``; no Gx term), with a tolerance of 1e-9 of plain pruning's error plus 1e-12
    of the denominator, taken from ``reported`` (plain pruning's terms on the error sample, scaled to all rows)
    where all rows have no Gx."""
    den = plain[1] if plain[1] is not None else reported[1] * rows / max(1, reported_rows)
    return bool(ours[0] - plain[0] > 1e-9 * (den + plain[0]) + 1e-12 * den)


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
        taps = ctx.taps.get(slot.key)
        if taps is not None:  # over (channel, tap) pairs, in the output space: the consumer there is I
            stats, reported = taps_stats(ctx, slot, taps)
            cmap, H = taps.map, None
        else:
            stats = slot_stats(ctx, slot)
            reported = error_stats(ctx, slot, stats)
            m = consumer_columns(get_param(ctx.gm, slot.consumer.weight), slot, torch.float64)
            H = m.T @ m
        both = (stats,) if reported is stats else (stats, reported)  # all rows, and the error sample if any
        plain = error_terms(H, None, cmap, None, *both)
        fold = Fold(None, recon_error_plain=as_error(*plain[-1]), columns=taps is not None)
        B, c, fallback = solve(stats, cmap, ctx.recipe.lam)
        if B is not None or c is not None:
            ours = error_terms(H, B, cmap, c, *both)
            fold.recon_error_grail, fold.fallback = as_error(*ours[-1]), fallback
            finite = all(t is None or bool(torch.isfinite(t).all()) for t in (B, c))
            if not finite or worse_than_plain(plain[0], ours[0], plain[-1], stats.rows, reported.rows):
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
