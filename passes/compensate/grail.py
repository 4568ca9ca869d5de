"""GRAIL: ridge least squares on the consumer's input Gram.

Approximate every channel (kept or removed) by the kept ones, x ~ B x_K, minimising sum ||x - B x_K||^2 + ridge:

    B = G[:, K] (G[K, K] + lam * mean(diag G[K, K]) I)^-1        (float64)

With lam = 0 and G[K, K] invertible, B[K] = I: kept channels pass through exactly. After sequential calibration
the target is the dense input x while the model sees z: B = C[:, K] (Gz[K, K] + lam * mean(diag) I)^-1 with
C = sum x z^T. The system is solved by
Cholesky; when G[K, K] is singular (dead channels, too few calibration rows) a jitter of 1e-10 * mean diag is
tried, then a least-squares (minimum-norm) solve, and the fallback is recorded.
"""

from __future__ import annotations

import torch

from grailc.registry import compensator


def ridge_map(G: torch.Tensor, keep: torch.Tensor, lam: float, cross: torch.Tensor | None = None):
    """B and the fallback used (None, "jitter" or "lstsq")."""
    G = G.to(torch.float64)
    gkk = G[keep][:, keep]
    scale = torch.diagonal(gkk).mean().clamp_min(1e-300)
    eye = torch.eye(len(keep), dtype=torch.float64)
    rhs = (G if cross is None else cross.to(torch.float64))[:, keep].T.contiguous()  # B^T = A^-1 C[:, K]^T
    for jitter, tag in ((0.0, None), (1e-10, "jitter")):
        A = gkk + (lam + jitter) * scale * eye
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, L).T.contiguous(), tag
    sol = torch.linalg.lstsq(gkk + lam * scale * eye, rhs, driver="gelsd").solution
    return sol.T.contiguous(), "lstsq"


@compensator("grail")
def grail(G, keep, lam, cross=None):
    return ridge_map(G, keep, lam, cross)
