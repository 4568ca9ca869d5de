"""Every op-table row: its facts are found, keep-all is the identity, and keeping a subset of channels leaves
the consumer's input equal to the original's kept channels (the op commutes with slicing)."""

from __future__ import annotations

import copy

import pytest
import torch
from grailc.passes.apply import rewrite
from graph_checks import group_of, prune_and_compare, traced
from torch import nn

from grailc.channel_map import ChannelMap
from grailc.context import Decision
from grailc.ops import ELEMENTWISE, OP_TABLE
from grailc.ops import SPATIAL_2D as SPATIAL

aten = torch.ops.aten
C = 8
KEEP = torch.tensor([0, 2, 3, 6, 7])

# extra arguments for ops that need them; inputs made positive for ops defined there only
EXTRA = {"hardtanh": (-1.0, 1.0), "hardtanh_": (-1.0, 1.0), "leaky_relu": (0.1,), "leaky_relu_": (0.1,),
         "dropout": (0.0, False), "dropout_": (0.0, False), "feature_dropout": (0.0, False),
         "alpha_dropout": (0.0, False), "clamp": (-1.0, 1.0), "clamp_": (-1.0, 1.0), "clamp_min": (0.0,),
         "clamp_min_": (0.0,), "clamp_max": (1.0,), "pow": (2.0,), "native_dropout": (0.0, False),
         "to": (torch.float32,), "type_as": (torch.zeros(1),), "celu": (1.0,)}
POSITIVE = {"sqrt", "rsqrt", "reciprocal", "log"}


def overload(name: str):
    packet, _, ov = name.partition(".")
    return getattr(getattr(aten, packet), ov or "default")


class Sandwich(nn.Module):
    """conv_in -> body -> conv_out: the group of conv_in is the one under test."""

    def __init__(self, body, c_out: int = 4):
        super().__init__()
        self.conv_in = nn.Conv2d(3, C, 3, padding=1)
        self.body = body
        self.conv_out = nn.Conv2d(C, c_out, 1)

    def forward(self, x):
        return self.conv_out(self.body(self.conv_in(x)))


class Unary(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name, self.op = name, overload(name)

    def forward(self, y):
        if self.name.split(".")[0] in POSITIVE:
            y = y.abs() + 1
        return self.op(y, *EXTRA.get(self.name.split(".")[0], ()))


class Binary(nn.Module):
    """op(y, other): ``other`` is a per-channel parameter (carried) or a scalar."""

    def __init__(self, name, other: str):
        super().__init__()
        self.op, self.other = overload(name), other
        self.scale = nn.Parameter(torch.rand(C, 1, 1) + 0.5)

    def forward(self, y):
        if self.other == "param":
            return self.op(y, self.scale)
        return self.op(y, *EXTRA.get(str(self.op).split(".")[1], (1.5,)))


class TwoProducers(Sandwich):
    """op(conv_in(x), conv_b(x)) -> conv_out: both producers hold the same channels."""

    def __init__(self, name):
        super().__init__(nn.Identity())
        self.op = overload(name)
        self.conv_b = nn.Conv2d(3, C, 1)

    def forward(self, x):
        return self.conv_out(self.op(self.conv_in(x), self.conv_b(x)))


def run_row(model, shape=(1, 3, 10, 10), producer="conv_in", ops=(), keep=KEEP):
    gm, deps = traced(model, shape)
    targets = {n.target for n in gm.graph.nodes}
    for op in ops:
        assert op in targets, f"{op} does not appear in the exported graph"
    group = group_of(deps, producer)
    assert group.prunable, group.pinned
    x = torch.randn(3, *shape[1:])
    # keeping every unit in a random order is the identity
    twin = copy.deepcopy(gm)
    order = torch.randperm(group.size, generator=torch.Generator().manual_seed(0))
    rewrite(twin, deps, {group.id: Decision(ChannelMap.select(order, group.size))}, {})
    twin.recompile()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), gm(x), atol=1e-6, rtol=1e-6)
    prune_and_compare(gm, deps, group, keep, x)
    return gm, deps, group


UNARY_ROWS = [n for n in ELEMENTWISE.split() if n not in ("lift_fresh_copy", "feature_dropout", "alpha_dropout",
                                                         "to.device", "to.dtype_layout", "logical_not", "bitwise_not",
                                                         "native_dropout", "to.dtype")]
BROADCAST_TENSOR = ["add.Tensor", "add_.Tensor", "sub.Tensor", "sub_.Tensor", "mul.Tensor", "mul_.Tensor",
                    "div.Tensor", "div_.Tensor", "maximum", "minimum"]
BROADCAST_SCALAR = ["add.Scalar", "add_.Scalar", "sub.Scalar", "mul.Scalar", "mul_.Scalar", "div.Scalar",
                    "div_.Scalar", "pow.Tensor_Scalar", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max"]


@pytest.mark.parametrize("name", UNARY_ROWS)
def test_elementwise_row(name):
    run_row(Sandwich(Unary(name)), ops=[overload(name)])


@pytest.mark.parametrize("name", BROADCAST_TENSOR)
def test_broadcast_row_ties_two_producers(name):
    _, _, group = run_row(TwoProducers(name), ops=[overload(name)])
    assert sorted(group.modules()) == ["conv_b", "conv_in"]
    assert group.kind == ("gated" if name.startswith(("mul", "div")) else "residual")


class SlicedProjection(nn.Module):
    """One projection sliced on the channel axis into three ranges, each read by its own consumer (as Phi-3 slices
    its fused qkv_proj): conv_in's 8 channels -> [0:3], [3:5], [5:8]."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, C, 1)
        self.conv_a, self.conv_b, self.conv_c = nn.Conv2d(3, 4, 1), nn.Conv2d(2, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv_in(x)
        return self.conv_a(y[:, :3]) + self.conv_b(y[:, 3:5]) + self.conv_c(y[:, 5:])


def test_slices_of_the_channel_axis_split_their_producer_into_parts():
    gm, deps = traced(SlicedProjection(), (2, 3, 6, 6))
    parts = sorted((g for g in deps.groups.values() if "conv_in" in g.modules()), key=lambda g: g.id)
    assert [g.size for g in parts] == [3, 2, 3] and all(g.prunable for g in parts)
    assert [len(g.consumers) for g in parts] == [1, 1, 1]
    x = torch.randn(2, 3, 6, 6)
    for g, keep in zip(parts, ([0, 2], [1], [1, 2])):  # each part alone: the later slices' bounds move
        prune_and_compare(gm, deps, g, torch.tensor(keep), x)


class ExplicitGroupedAttention(nn.Module):
    """Attention written out (as eager attention in transformers): q k^T and the weights times v by matmul, the
    2 key-value heads repeated for the 4 query heads by expand and reshape (repeat_kv), the heads merged back."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 32)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 8).transpose(1, 2)
        k, v = (f(x).view(b, t, 2, 8).transpose(1, 2)[:, :, None].expand(b, 2, 2, t, 8).reshape(b, 4, t, 8)
                for f in (self.k, self.v))
        weights = torch.softmax(torch.tanh(q @ k.transpose(-1, -2) / 8.0) * 8.0, dim=-1)
        return self.o((weights @ v).transpose(1, 2).reshape(b, t, 32))


def test_explicit_attention_over_repeated_values_keeps_the_query_heads():
    gm, deps = traced(ExplicitGroupedAttention(), (2, 5, 32))
    g = group_of(deps, "q")
    assert g.kind == "heads" and g.prunable and g.size == 2 and sorted(g.modules()) == ["k", "q", "v"]
    prune_and_compare(gm, deps, g, torch.tensor([1]), torch.randn(2, 5, 32))


class InterleavedRotaryHeads(nn.Module):
    """Attention whose rotary embedding pairs neighbouring channels inside each head on the first half of head_dim
    (as GLM's: x[..., 0::2] and x[..., 1::2] stacked on a new last axis and flattened back); ``mix_time``: the
    flatten merges time into the head's channels instead ([B, H, T, D] -> [B, H, T*D]), which is not within-head."""

    def __init__(self, mix_time: bool = False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))
        self.mix_time = mix_time

    def rotate(self, x):
        rot, rest = x[..., :4], x[..., 4:]
        pairs = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
        return torch.cat((rot * 0.5 + pairs * 0.25, rest), dim=-1)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, 4, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.mix_time:
            v = v.flatten(-2).view(b, 4, t, 8)
        out = nn.functional.scaled_dot_product_attention(self.rotate(q), self.rotate(k), v)
        return self.o(out.transpose(1, 2).reshape(b, t, 32))


def test_an_interleaved_rotary_inside_heads_keeps_them_prunable():
    gm, deps = traced(InterleavedRotaryHeads(), (2, 5, 32))
    g = group_of(deps, "q")
    assert g.kind == "heads" and g.prunable and g.size == 4
    prune_and_compare(gm, deps, g, torch.tensor([0, 3]), torch.randn(2, 5, 32))


def test_a_reshape_that_merges_time_into_the_heads_channels_pins_them():
    _, deps = traced(InterleavedRotaryHeads(mix_time=True), (2, 5, 32))
    g = group_of(deps, "v")
    assert not g.prunable and "reshape that splits or mixes the channel axis" in g.pinned


class SlicedAcrossTies(nn.Module):
    """A slice whose range cuts a space already tied elsewhere (the residual add) cannot split it: pinned."""

    def __init__(self):
        super().__init__()
        self.conv_in, self.conv_b = nn.Conv2d(3, C, 1), nn.Conv2d(3, C, 1)
        self.conv_a = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv_in(x) + self.conv_b(x)
        return self.conv_a(y[:, 2:5])


def test_a_slice_across_tied_channels_pins_them():
    _, deps = traced(SlicedAcrossTies(), (2, 3, 6, 6))
    g = group_of(deps, "conv_in")
    assert not g.prunable and "slice of the channel axis across tied channels" in g.pinned


@pytest.mark.parametrize("name", ["add.Tensor", "mul.Tensor", "sub.Tensor", "div.Tensor"])
def test_broadcast_row_carries_per_channel_parameter(name):
    _, _, group = run_row(Sandwich(Binary(name, "param")), ops=[overload(name)])
    assert any(("body.scale", 0) in c.params for c in group.carriers)


@pytest.mark.parametrize("name", BROADCAST_SCALAR)
def test_broadcast_row_with_scalar(name):
    run_row(Sandwich(Binary(name, "scalar")), ops=[overload(name)])


class FirstOf(nn.Module):
    def forward(self, pair):
        return pair[0]


class Masks(nn.Module):
    """Comparisons, where, masked_fill, lerp, addcmul and rsub on the channels: every output keeps them."""

    def forward(self, y):
        pos = y > 0.1
        z = torch.where(pos, y, -y).masked_fill(y < -2.0, 0.0)
        z = torch.lerp(z, y, 0.3) + torch.addcmul(y, y, z, value=0.5) - (1.0 - y) + y.abs().pow(y.abs() + 1) * 1e-3
        return z * (y >= 0).float() + (y == 0).float() + (pos & (y != 1.0)).float()


def test_masks_and_selections_keep_channels():
    run_row(Sandwich(Masks()), ops=[aten.where.self, aten.gt.Scalar, aten.lerp.Scalar, aten.addcmul.default])


SPATIAL_MODULES = {
    "upsample_bicubic2d.vec": nn.Upsample(scale_factor=2, mode="bicubic"),
    "_upsample_bilinear2d_aa.vec": nn.Identity(),
    "max_pool2d_with_indices": nn.Sequential(nn.MaxPool2d(2, return_indices=True), FirstOf()),
    "max_pool2d": nn.MaxPool2d(2),
    "avg_pool2d": nn.AvgPool2d(2),
    "adaptive_avg_pool2d": nn.AdaptiveAvgPool2d(3),
    "adaptive_max_pool2d": nn.AdaptiveMaxPool2d(3),
    "upsample_nearest2d.vec": nn.Upsample(scale_factor=2, mode="nearest"),
    "upsample_bilinear2d.vec": nn.Upsample(scale_factor=2, mode="bilinear"),
}


@pytest.mark.parametrize("name", [n for n in SPATIAL.split() if n != "_upsample_bilinear2d_aa.vec"])
def test_spatial_row(name):
    gm, _, _ = run_row(Sandwich(SPATIAL_MODULES[name]))
    # adaptive_max_pool2d is exported as a tuple-returning op plus getitem; the others as themselves
    assert any(name.split(".")[0] in str(n.target) for n in gm.graph.nodes)


def test_batch_norm_row_carries_statistics():
    _, _, group = run_row(Sandwich(nn.BatchNorm2d(C)), ops=[aten.batch_norm.default])
    params = {t for c in group.carriers for t, _ in c.params}
    assert {"body.weight", "body.bias", "body.running_mean", "body.running_var"} <= params


def test_depthwise_conv_is_tied_and_its_groups_follow():
    gm, deps, group = run_row(Sandwich(nn.Sequential(nn.Conv2d(C, C, 3, padding=1, groups=C), nn.ReLU())))
    car = next(c for c in group.carriers if c.module == "body.0")
    assert car.size_args == [(6, None, 1)]


def test_grouped_conv_keeps_whole_blocks():
    _, _, group = run_row(Sandwich(nn.Conv2d(C, C, 3, padding=1, groups=2)), keep=torch.tensor([1]))
    assert group.size == 2 and group.granule == C // 2  # two blocks of four channels, kept or removed whole
    car = next(c for c in group.carriers if c.module == "body")
    assert car.size_args == [(6, None, C // 2)]


class FlattenHead(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv_in = nn.Conv2d(3, C, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.fc = nn.Linear(C * 9, 5)

    def forward(self, x):
        y = self.pool(self.conv_in(x))
        if self.how == "flatten":
            y = torch.flatten(y, 1)
        elif self.how == "view":
            y = y.reshape(y.shape[0], C * 9)
        return self.fc(y)


@pytest.mark.parametrize("how", ["flatten", "view"])
def test_flatten_and_view_to_linear_keep_channel_stride(how):
    _, _, group = run_row(FlattenHead(how))
    slot = group.consumers[0]
    assert slot.consumer.kind == "linear" and slot.consumer.layout.inner == 9


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, C, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(C + 5)
        self.conv_out = nn.Conv2d(C + 5, 4, 1)

    def forward(self, x):
        return self.conv_out(self.bn(torch.cat([self.conv_b(x), self.conv_in(x)], dim=1)))


def test_concat_offsets_segments():
    _, deps, group = run_row(Cat(), ops=[aten.cat.default])
    slot = group.consumers[0]
    assert (slot.offset, slot.size) == (5, C)
    other = group_of(deps, "conv_b")
    assert other.id != group.id and other.consumers[0].offset == 0


class Reduce(nn.Module):
    def forward(self, y):
        return y.mean(dim=(2, 3), keepdim=True) + y.amax(dim=(2, 3), keepdim=True)


def test_reduce_over_space_keeps_channels():
    run_row(Sandwich(Reduce()), ops=[aten.mean.dim, aten.amax.default])


class Pad(nn.Module):
    def forward(self, y):
        return nn.functional.pad(y, (1, 0, 2, 1))


def test_pad_of_spatial_axes():
    run_row(Sandwich(Pad()))


class ChannelMean(nn.Module):
    def forward(self, y):
        return y - y.mean(dim=1, keepdim=True)


def test_reduction_over_channels_is_lossy():
    _, deps = traced(Sandwich(ChannelMean()), (1, 3, 10, 10))
    group = group_of(deps, "conv_in")
    assert group.prunable and group.lossy and "statistic over the channels" in group.lossy


def test_every_rule_class_is_exercised():
    """The tests above cover each kind of rule in the table."""
    exercised = {"Elementwise", "Broadcast", "Spatial", "BatchNorm", "Conv", "Linear", "Concat", "Reduce",
                 "Getitem", "Pad", "Reshape", "Softmax", "LayerNorm", "GroupNorm", "Embedding", "Permute", "Expand",
                 "Repeat", "Select", "Slice", "Index", "Split", "Stack", "Roll", "Attention", "Matmul"}
    assert {type(rule).__name__ for rule in OP_TABLE.values()} == exercised
