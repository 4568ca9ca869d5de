"""GRAIL: ridge least squares on the consumer's input Gram.

Approximate every channel (kept or removed) by the kept ones, x ~ B x_K, minimising
sum ||x - B x_K||^2 + r ||B - I[:, K]||^2 with r = lam * mean(diag G[K, K]): the ridge pulls B towards plain
pruning (kept channels pass through, removed ones are dropped), not towards zero:

    B = (G[:, K] + r I[:, K]) (G[K, K] + r I)^-1        (float64)

Through a fold's channel map (z = R x, plain spread U; see :mod:`grailc.channel_map`) the same solve reads

    B = (G R^T + r U) (R G R^T + r I)^-1

of which a selection is the case R = I[K], U = I[:, K]; ``grail_fold`` names it for recipes that fold.

so B[K] = I for every lam (kept channels pass through exactly) and only the removed channels' reconstruction
B[R] = G[R, K] (G[K, K] + r I)^-1 is shrunk; a large lam gives plain pruning. (Shrinking B[K] towards zero as well,
as a plain ridge does, damps the kept channels: on SmolLM2's MLPs with 2k calibration tokens that made GRAIL worse
than plain pruning at every lam tried, while this form beats it.) After sequential calibration the target is the
dense input x while the model sees z: B = (C[:, K] + r I[:, K]) (Gz[K, K] + r I)^-1 with C = sum x z^T. The
system is solved by
Cholesky; when G[K, K] is singular (dead channels, too few calibration rows) a jitter of 1e-10 * mean diag is
tried, then a least-squares (minimum-norm) solve, and the fallback is recorded.

``grail+bias`` is the affine version: x ~ B z_K + c, ridge least squares on the augmented input [z_K, 1], whose
Gram is built from Gz, the sums and the row count n (the constant is not penalised):

    [B c] = [C[:, K] + r I[:, K]  sx] ( [[Gz[K, K], sz[K]], [sz[K]^T, n]] + r diag(1, .., 1, 0) )^-1

Where the consumer cannot take a bias (no sums), it is plain ``grail``.
"""

from __future__ import annotations

import torch

from grailc.channel_map import ChannelMap
from grailc.context import SlotStats
from grailc.registry import compensator


def ridge_solve(A: torch.Tensor, rhs: torch.Tensor, ridge: torch.Tensor, scale: torch.Tensor):
    """X = (A + diag(ridge))^-1 rhs and the fallback used (None, "jitter": + 1e-10 * scale I, or "lstsq")."""
    A = A + torch.diag(ridge)
    eye = torch.eye(A.shape[0], dtype=torch.float64)
    for jitter, tag in ((0.0, None), (1e-10, "jitter")):
        L, info = torch.linalg.cholesky_ex(A + jitter * scale * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, L), tag
    return torch.linalg.lstsq(A, rhs, driver="gelsd").solution, "lstsq"


def ridge_map(G: torch.Tensor, cmap: ChannelMap, lam: float, cross: torch.Tensor | None = None):
    """B and the fallback used (None, "jitter" or "lstsq")."""
    G = G.to(torch.float64)
    gkk = cmap.gram(G)
    scale = torch.diagonal(gkk).mean().clamp_min(1e-300)
    rhs = (cmap.cols(G if cross is None else cross.to(torch.float64)) + lam * scale * cmap.U()).T.contiguous()
    sol, tag = ridge_solve(gkk, rhs, torch.full((cmap.k,), lam * scale, dtype=torch.float64), scale)
    return sol.T.contiguous(), tag


def affine_ridge_map(stats: SlotStats, cmap: ChannelMap, lam: float):
    """B, c and the fallback used, from the augmented Gram of [z_K, 1]."""
    k = cmap.k
    gkk = cmap.gram(stats.Gz.to(torch.float64))
    s = cmap.vec(stats.sz.to(torch.float64))
    A = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    A[:k, :k], A[:k, k], A[k, :k], A[k, k] = gkk, s, s, float(stats.rows)
    scale = torch.diagonal(gkk).mean().clamp_min(1e-300)
    cols = cmap.cols(stats.C.to(torch.float64)) + lam * scale * cmap.U()  # the ridge pulls B towards U, as above
    rhs = torch.cat([cols, stats.sx.to(torch.float64)[:, None]], dim=1).T.contiguous()
    ridge = torch.cat([torch.full((k,), lam * scale, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    sol, tag = ridge_solve(A, rhs, ridge, scale)  # [k + 1, size] = [B^T; c^T]
    return sol[:k].T.contiguous(), sol[k].contiguous(), tag


@compensator("grail_fold")
@compensator("grail")
def grail(stats: SlotStats, cmap: ChannelMap, lam):
    B, tag = ridge_map(stats.Gz, cmap, lam, stats.C)
    return B, None, tag


@compensator("grail+bias")
def grail_bias(stats: SlotStats, cmap: ChannelMap, lam):
    if stats.sz is None:
        return grail(stats, cmap, lam)
    return affine_ridge_map(stats, cmap, lam)
