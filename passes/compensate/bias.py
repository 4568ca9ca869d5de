"""Bias compensation: plain pruning (B = I[:, K]) plus the mean the pruned input loses, moved into the consumer's
bias. The offset minimising the reconstruction error for B = I[:, K] is

    c = (sx - I[:, K] sz[K]) / n,        b' = b + W c

which, when the model sees the dense input (z = x), is the mean of the removed channels (0 on the kept ones):
b' = b + W[:, removed] mean(x_removed). For a conv, W is summed over kernel taps (and a linear after flatten over
positions): exact where every tap sees the mean, i.e. ignoring the zero padding at the borders. A consumer that
has no bias gets one.
"""

from __future__ import annotations

import torch

from grailc.context import SlotStats
from grailc.registry import compensator


@compensator("bias")
def mean_shift(stats: SlotStats, keep, lam):
    if stats.sz is None:
        return None, None, None
    c = stats.sx.to(torch.float64).clone()
    c[keep] -= stats.sz.to(torch.float64)[keep]
    return None, c / stats.rows, None
