"""Channel maps: a selection is the fold R = I[K], U = I[:, K]; folding duplicated channels is exact."""

from __future__ import annotations

import copy

import torch
from grailc.passes.apply import rewrite
from grailc.passes.compensate.grail import ridge_map
from grailc.passes.select.fold import cluster, unit_features
from torch import nn

from grailc.analysis import analyse
from grailc.channel_map import ChannelMap
from grailc.context import Decision
from grailc.trace import trace


def test_a_selection_reads_like_its_matrices():
    keep = torch.tensor([3, 0, 2])
    sel = ChannelMap.select(keep, 5)
    torch.testing.assert_close(sel.R(), torch.eye(5, dtype=torch.float64)[keep])
    torch.testing.assert_close(sel.U(), sel.R().T)
    G = torch.randn(5, 5, dtype=torch.float64)
    as_fold = ChannelMap(5, merge=sel.R(), spread=sel.U())
    for name in ("gram", "cols"):
        torch.testing.assert_close(getattr(sel, name)(G), getattr(as_fold, name)(G))
    v = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(sel.vec(v), as_fold.vec(v))
    torch.testing.assert_close(sel.back(sel.vec(v)), as_fold.back(as_fold.vec(v)))
    t = torch.randn(2, 5, 3)
    torch.testing.assert_close(sel.rows(t, 1), as_fold.rows(t, 1))
    # per index (a unit of 2 indices) and stacked segments agree with the matrices too
    two = ChannelMap.identity(2)
    for a, b in ((sel.per_index(2), as_fold.per_index(2)),
                 (ChannelMap.stack([sel, two]), ChannelMap.stack([as_fold, two]))):
        torch.testing.assert_close(a.R(), b.R())
        torch.testing.assert_close(a.U(), b.U())


def test_a_fold_averages_each_cluster_and_reads_it_back():
    fold = ChannelMap.fold(torch.tensor([1, 0, 1, 1]), 2)
    torch.testing.assert_close(fold.R(), torch.tensor([[0, 1, 0, 0], [1 / 3, 0, 1 / 3, 1 / 3]], dtype=torch.float64))
    torch.testing.assert_close(fold.U(), torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1]], dtype=torch.float64))
    assert fold.k == 2 and not fold.is_selection


def test_grail_through_a_fold_is_least_squares_on_the_merged_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    fold = ChannelMap.fold(torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    z = x @ fold.R().T
    B, _ = ridge_map(x.T @ x, fold, 0.0)
    torch.testing.assert_close(B, torch.linalg.lstsq(z, x).solution.T)
    B, _ = ridge_map(x.T @ x, fold, 1e12)  # a huge ridge gives the plain fold, W U
    torch.testing.assert_close(B, fold.U(), atol=1e-6, rtol=0)


class Duplicated(nn.Module):
    """conv -> BN -> ReLU -> conv, whose first conv computes every channel twice (with the same BN)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 5, 1)
        with torch.no_grad():
            self.conv1.weight[4:] = self.conv1.weight[:4]
            self.conv1.bias[4:] = self.conv1.bias[:4]
            for t in (self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var):
                t.uniform_(0.5, 1.5)
                t[4:] = t[:4]

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def test_folding_duplicated_channels_is_exact_where_pruning_is_not():
    model = Duplicated().eval()
    x = torch.randn(2, 3, 6, 6)
    gm, _ = trace(model, (x,))
    deps = analyse(gm)
    group = next(g for g in deps.prunable() if g.size == 8)
    ctx = type("Ctx", (), {"gm": gm})()
    labels = cluster(unit_features(ctx, group), 4, seed=0)
    assert len(set(labels.tolist())) == 4 and torch.equal(labels[:4], labels[4:])
    with torch.no_grad():
        expected = gm(x)
        folded = copy.deepcopy(gm)
        rewrite(folded, deps, {group.id: Decision(ChannelMap.fold(labels, 4))}, {})
        folded.recompile()
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)
        assert get_conv_width(folded) == 4
        pruned = copy.deepcopy(gm)
        rewrite(pruned, deps, {group.id: Decision(ChannelMap.select(torch.arange(4), 8))}, {})
        pruned.recompile()
        assert (pruned(x) - expected).norm() > 0.1 * expected.norm()


def get_conv_width(gm) -> int:
    return next(p.shape[0] for n, p in gm.named_parameters() if p.dim() == 4)
