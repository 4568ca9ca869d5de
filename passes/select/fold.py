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

Channels that a channel shuffle spreads apart (ShuffleNet) cannot be merged: there each cluster keeps its medoid.
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
        rows = slot.take(w, 0).reshape(group.size, -1)
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
    features = unit_features(ctx, group)
    labels = cluster(features, k, ctx.recipe.calib.seed)
    if group.shuffled:
        return ChannelMap.select(medoids(features, labels), group.size)
    return ChannelMap.fold(labels, k)


def medoids(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The unit nearest each cluster's mean (sorted): a fold's representatives, for groups whose channels a
    channel shuffle spreads apart, where merged channels would have no index to sit at."""
    picked = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        mean = features[members].mean(0)
        picked.append(members[(features[members] - mean).square().sum(1).argmin()])
    return torch.stack(picked).sort().values
