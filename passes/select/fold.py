"""Folding: instead of dropping units, merge similar ones.

The units of a group (channels, heads, conv groups) are clustered into k clusters by k-means on their producers'
weights (a unit's feature: its rows of every producer, each producer scaled to unit mean row energy so that the
producers of a residual group count alike; k-means++ seeded by ``calib.seed``, so the result is deterministic).
The decision is the channel map of the clusters (see :mod:`grailc.channel_map`): producers and carriers become the
cluster means (R averages a cluster), and a consumer reads each old unit back from its cluster (U), so without
compensation W' = W U sums a cluster's columns. GRAIL compensates through the same map (``grail`` or its alias
``grail_fold``): B = (G R^T + r U)(R G R^T + r I)^-1.

Merging is exact only where every unit of a cluster carries the same signal; between a producer and a consumer
there is usually a nonlinearity, so the merged channel is the activation of the averaged pre-activation, an
approximation, and BatchNorm variances are averaged too (``--repair`` re-estimates them).
"""

from __future__ import annotations

import warnings

import torch

from grailc.channel_map import ChannelMap
from grailc.registry import selector
from grailc.surgery import get_param


def unit_features(ctx, group) -> torch.Tensor:
    """[units, features] float64: each unit's rows of every producer, one producer scaled to unit mean energy."""
    parts = []
    for slot in group.producers:
        w = get_param(ctx.gm, slot.fact.weight).detach().to("cpu", torch.float64).movedim(slot.fact.dim, 0)
        rows = w[slot.offset : slot.offset + slot.size].reshape(group.size, -1)
        parts.append(rows / rows.square().sum(1).mean().sqrt().clamp_min(1e-300))
    return torch.cat(parts, dim=1)


def cluster(features: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means labels [units] (k clusters, deterministic for a seed)."""
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():  # fewer distinct points than clusters: some clusters stay empty, which is fine
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(features.numpy())
    return torch.from_numpy(km.labels_).to(torch.long)


@selector("fold")
def fold(ctx, group) -> ChannelMap:
    from grailc.passes.select import units_kept

    k = units_kept(ctx, group)
    return ChannelMap.fold(cluster(unit_features(ctx, group), k, ctx.recipe.calib.seed), k)
