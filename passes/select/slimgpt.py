"""Greedy removal by the compensated error (Optimal Brain Surgeon on the consumer's columns), as SlimGPT does.

For a consumer with columns W [rows, size] and input Gram G, removing the columns Q and letting the kept ones
absorb them (W' = W B, B the least-squares map of GRAIL) raises the output error by

    dE(Q) = tr( W_Q [Hinv_QQ]^-1 W_Q^T ),      Hinv = (G + d I)^-1,  d = damp * mean(diag G)

after which the survivors are updated, W <- W - W_Q [Hinv_QQ]^-1 Hinv_Q,:, and Q is dropped from Hinv by the
same Schur complement. A unit (a head: its columns together) is scored as one block Q. Units go in batches
(SlimGPT's batched greedy pruning): each step removes the ``1 / STEPS`` of the units still to go that raise the
error least, then rescores. The order of removal is the score (removed first = lowest), so the selection pass
keeps the units removed last. Residual groups sum the normalised errors of their consumers.

The weight update SlimGPT makes is the GRAIL map on the same Gram: run with ``--compensate grail`` (``--lam`` the
damping) for SlimGPT proper, ``--compensate none`` for its scores alone. ``gram`` names the same selection for
any model: the channels kept are the ones that best rebuild the removed ones through the consumer.
"""

from __future__ import annotations

import math

import torch

from grailc.channels import unit_indices
from grailc.registry import selector
from grailc.surgery import consumer_columns, get_param

STEPS = 8
DAMP = 0.01


def _units_to_remove(ctx, group) -> int:
    from grailc.passes.select import units_kept

    return group.size - units_kept(ctx, group)


class _SlotState:
    """One consumer slot: its columns and inverse Gram, both narrowed as units go. The columns W [rows, size] are
    held as a factor F with F^T F = W^T W (W itself, or the R of W = QR where W has more rows than columns: a conv
    has output channels times kernel taps rows); every update multiplies W on the right, so F takes it alike."""

    def __init__(self, ctx, slot):
        G = ctx.grams[slot.key].to(torch.float64)
        d = DAMP * torch.diagonal(G).mean().clamp_min(1e-300)
        self.per_unit = slot.per_unit
        W = consumer_columns(get_param(ctx.gm, slot.consumer.weight), slot, torch.float64)
        self.W = torch.linalg.qr(W, mode="r").R if W.shape[0] > W.shape[1] else W
        self.Hinv = torch.cholesky_inverse(torch.linalg.cholesky(G + d * torch.eye(G.shape[0], dtype=G.dtype)))
        self.total = float(((self.W @ G) * self.W).sum()) or 1.0

    def scores(self) -> torch.Tensor:
        """dE of removing each alive unit alone, relative to the consumer's output energy."""
        p = self.per_unit
        if p == 1:
            return self.W.square().sum(0) / torch.diagonal(self.Hinv) / self.total
        n = self.W.shape[1] // p  # alive units, in column-block order
        blocks = self.Hinv.reshape(n, p, n, p).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [n, p, p]
        Wb = self.W.reshape(self.W.shape[0], n, p).permute(1, 0, 2)  # [n, rows, p]
        solved = torch.linalg.solve(blocks, Wb.transpose(1, 2))  # [n, p, rows]
        return torch.einsum("nrp,npr->n", Wb, solved) / self.total

    def remove(self, positions: list[int]) -> None:
        """Remove the alive units at these positions and update W and Hinv (OBS)."""
        q = unit_indices(torch.tensor(positions), self.per_unit)
        keep = torch.ones(self.W.shape[1], dtype=torch.bool)
        keep[q] = False
        hqq = self.Hinv[q][:, q]
        hq = self.Hinv[q][:, keep]  # [|q|, kept]: only the survivors' rows and columns are updated
        step = torch.linalg.solve(hqq, hq)  # [Hinv_QQ]^-1 Hinv_Q,K
        self.W = self.W[:, keep] - self.W[:, q] @ step
        self.Hinv = self.Hinv[keep][:, keep] - hq.T @ step


@selector("gram")
@selector("slimgpt")
def slimgpt(ctx, group) -> torch.Tensor:
    to_remove = _units_to_remove(ctx, group)
    states = [_SlotState(ctx, slot) for slot in group.consumers]
    score = torch.zeros(group.size, dtype=torch.float64)
    alive = list(range(group.size))
    order = 0
    batch = max(1, math.ceil(to_remove / STEPS))
    while order < to_remove:
        errors = sum(s.scores() for s in states)
        cheapest = torch.argsort(errors, stable=True)[: min(batch, to_remove - order)].tolist()
        for position in cheapest:
            score[alive[position]] = -1e6 + order  # removed first = lowest score
            order += 1
        for s in states:
            s.remove(cheapest)
        gone = set(cheapest)
        alive = [u for i, u in enumerate(alive) if i not in gone]
    for rank, unit in enumerate(alive):  # the survivors rank above every removed unit (in index order)
        score[unit] = float(rank)
    return score
