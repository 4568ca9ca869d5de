"""Bias compensation: plain pruning (B = U, I[:, K] for a selection) plus the mean the pruned input loses, moved
into the consumer's bias. The offset minimising the reconstruction error for B = U is

    c = (sx - U R sz) / n,        b' = b + W c        (sx - I[:, K] sz[K] for a selection)

which, when the model sees the dense input (z = x), is the mean of the removed channels (0 on the kept ones):
b' = b + W[:, removed] mean(x_removed). For a conv, W is summed over kernel taps (and a linear after flatten over
positions): exact where every tap sees the mean, i.e. ignoring the zero padding at the borders. A consumer that
has no bias gets one.
"""

from __future__ import annotations

import torch

from grailc.channel_map import ChannelMap
from grailc.context import SlotStats
from grailc.registry import compensator


@compensator("bias")
def mean_shift(stats: SlotStats, cmap: ChannelMap, lam):
    if stats.sz is None:
        return None, None, None
    c = stats.sx.to(torch.float64) - cmap.back(cmap.vec(stats.sz.to(torch.float64)))
    return None, c / stats.rows, None
