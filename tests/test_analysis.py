"""Channel groups found on real torchvision architectures and on graphs with ops the analysis does not know."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from grailc.passes.apply import rewrite
from grailc.passes.verify import permutation_error
from graph_checks import group_of, masked_reference, prune_and_compare, traced
from torch import nn

from grailc.channel_map import ChannelMap
from grailc.context import Decision


@pytest.fixture(scope="module")
def resnet18():
    return traced(torchvision.models.resnet18(weights=None), (1, 3, 64, 64))


def test_resnet_residual_group_spans_the_stage_and_its_readers(resnet18):
    gm, deps = resnet18
    g = group_of(deps, "conv1")
    assert g.kind == "residual" and g.prunable
    assert sorted(g.modules()) == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    readers = sorted(s.consumer.module for s in g.consumers)
    assert readers == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"]
    assert {"bn1", "layer1.0.bn2", "layer1.1.bn2"} <= {c.module for c in g.carriers}


def test_resnet_last_stage_feeds_fc_through_pool_and_flatten(resnet18):
    gm, deps = resnet18
    g = group_of(deps, "layer4.0.downsample.0")
    assert sorted(g.modules()) == ["layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2"]
    fc = [s for s in g.consumers if s.consumer.module == "fc"]
    assert len(fc) == 1 and fc[0].consumer.kind == "linear" and fc[0].consumer.layout.inner == 1


def test_model_interface_is_pinned(resnet18):
    gm, deps = resnet18
    assert group_of(deps, "fc").pinned == "model output"
    pinned = [g.pinned for g in deps.groups.values() if g.pinned]
    assert "model input" in pinned and len(deps.prunable()) == 12


def test_resnet_residual_group_prunes_consistently(resnet18):
    gm, deps = resnet18
    g = group_of(deps, "layer2.0.downsample.0")
    keep = torch.sort(torch.randperm(g.size, generator=torch.Generator().manual_seed(1))[:50]).values
    prune_and_compare(gm, deps, g, keep, torch.randn(2, 3, 64, 64), atol=1e-4)


def test_densenet_concat_slots_have_offsets():
    gm, deps = traced(torchvision.models.densenet121(weights=None), (1, 3, 64, 64))
    stem = group_of(deps, "features.conv0")
    # the stem's 64 channels sit at offset 0 of every dense layer of block 1 and of transition 1
    assert len(stem.consumers) == 7 and {s.offset for s in stem.consumers} == {0}
    layer = group_of(deps, "features.denseblock1.denselayer1.conv2")
    assert sorted({s.offset for s in layer.consumers}) == [64] and len(layer.consumers) == 6
    keep = torch.arange(0, 32, 2)
    prune_and_compare(gm, deps, layer, keep, torch.randn(2, 3, 64, 64), atol=1e-4)


def test_mobilenet_depthwise_convs_are_carried_in_the_expansion_group():
    gm, deps = traced(torchvision.models.mobilenet_v2(weights=None), (1, 3, 64, 64))
    g = group_of(deps, "features.2.conv.0.0")
    depthwise = [c for c in g.carriers if c.size_args]
    assert [c.module for c in depthwise] == ["features.2.conv.1.0"]
    assert [s.consumer.module for s in g.consumers] == ["features.2.conv.2"]
    prune_and_compare(gm, deps, g, torch.arange(0, 96, 3), torch.randn(2, 3, 64, 64), atol=1e-4)


class CumsumBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 8, 3)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.b(torch.cumsum(self.a(x), dim=1)).relu())


def test_unknown_op_pins_what_it_touches_and_says_so():
    gm, deps = traced(CumsumBetween(), (1, 3, 16, 16))
    a = group_of(deps, "a")
    assert a.pinned and "unknown op aten.cumsum.default" in a.pinned
    assert group_of(deps, "b").prunable
    assert [u["op"] for u in deps.unknown_ops] == ["aten.cumsum.default"]


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.shared(self.shared(self.a(x)).relu()))


def test_shared_parameters_pin_their_groups():
    gm, deps = traced(SharedConv(), (1, 3, 16, 16))
    a = group_of(deps, "a")
    assert a.pinned and "shared" in a.pinned


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_every_group_prunes_exactly_like_its_masked_reference(name):
    """Squeeze-excitation gates, hardswish, stochastic depth, depthwise convs: each group, pruned alone, computes
    what the original computes with that group's dropped channels ignored by their consumers."""
    gm, deps = traced(torchvision.models.get_model(name, weights=None), (1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    assert len(deps.prunable()) >= 27
    for group in deps.prunable():
        prune_and_compare(gm, deps, group, torch.arange(0, group.size, 2), x, atol=1e-4)


class Siamese(nn.Module):
    """One encoder conv called on two inputs; their features added: the shared rows hold the same channels."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.enc(x)) + torch.relu(self.enc(x.flip(-1))))


def test_module_called_twice_ties_its_uses_and_prunes_once():
    gm, deps = traced(Siamese(), (1, 3, 8, 8))
    group = group_of(deps, "enc")
    assert group.prunable and len(group.producers) == 2 and group.modules() == ["enc"]
    x = torch.randn(2, 3, 8, 8)
    assert permutation_error(gm, deps, [(x,)]) <= 1e-5
    prune_and_compare(gm, deps, group, torch.tensor([0, 3, 5]), x)


class SharedConsumer(nn.Module):
    """One conv applied twice in a row: its columns would need two different merges, so its input is pinned."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.shared(torch.relu(self.shared(torch.relu(self.a(x)))))


def test_shared_consumer_weight_pins_with_reason():
    _, deps = traced(SharedConsumer(), (1, 3, 8, 8))
    group = group_of(deps, "a")
    assert group.pinned and "parameter shared.weight is shared by nodes" in group.pinned


def shuffle(x, groups=2):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleBlocks(nn.Module):
    """ShuffleNet v2 in small: a block of two branches, then blocks that split the shuffled channels in halves, pass
    the first half on and transform the second, each ending in a channel shuffle."""

    def __init__(self, c=12, blocks=2):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left, self.right = nn.Conv2d(8, c // 2, 1), nn.Conv2d(8, c // 2, 1)
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(c // 2, c // 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU(),
                                                    nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2),
                                                    nn.BatchNorm2d(c // 2), nn.Conv2d(c // 2, c // 2, 1))
                                      for _ in range(blocks))
        self.head = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = shuffle(torch.cat([self.left(x), self.right(x)], 1))
        for branch in self.branches:
            a, b = x.chunk(2, dim=1)
            x = shuffle(torch.cat([a, branch(b)], 1))
        return self.head(x)


def test_channel_shuffle_is_an_index_map():
    gm, deps = traced(ShuffleBlocks(), (1, 3, 8, 8))
    assert all(g.pinned in (None, "model input", "model output") for g in deps.groups.values())
    shuffled = [g for g in deps.prunable() if g.shuffled]
    # each branch's output splits into the channels that go on and those the next block transforms
    assert len(shuffled) >= 6 and sum(g.size for g in shuffled) == 12 + 6 * 2
    second = [g for g in deps.prunable() if "left" in g.modules()
              and any(s.consumer.module == "branches.0.0" for s in g.consumers)]
    assert len(second) == 1 and second[0].size == 3  # left's channels 3..5, in the second half after the shuffle
    assert [s.positions for s in second[0].consumers] == [(0, 2, 4)]
    x = torch.randn(2, 3, 8, 8)
    assert permutation_error(gm, deps, [(x,)]) <= 1e-5
    g = torch.Generator().manual_seed(1)
    for group in deps.prunable():
        if group.size > 1:
            keep = torch.randperm(group.size, generator=g)[: max(1, group.size // 2)].sort().values
            prune_and_compare(gm, deps, group, keep, x)


def test_pruned_shuffle_becomes_one_gather_and_halves_may_differ():
    gm, deps = traced(ShuffleBlocks(), (1, 3, 8, 8))
    # left's channels 3..5: the second half of the first shuffle, read by the first block's branch
    left = next(g for g in deps.prunable() if g.modules() == ["left"] and g.size == 3
                and any(s.consumer.module == "branches.0.0" for s in g.consumers))
    keep = torch.tensor([0, 2])  # halves of 6 and 5 channels: no view to [N, 2, C/2] holds them
    pruned = copy.deepcopy(gm)
    rewrite(pruned, deps, {left.id: Decision(ChannelMap.select(keep, left.size))}, {})
    pruned.recompile()
    targets = [n.target for n in pruned.graph.nodes]
    assert targets.count(torch.ops.aten.index_select.default) == 1  # the other shuffles stay as they were
    assert targets.count(torch.ops.aten.transpose.int) == 2
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(pruned(x), masked_reference(gm, left, keep)(x), atol=1e-5, rtol=1e-4)
