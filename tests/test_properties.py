"""Property tests: random networks built from the supported families (conv chains, residual adds, concat and split,
depthwise and grouped blocks, ShuffleNet units with their channel shuffle, flatten heads, channels-last MLP blocks,
attention blocks with heads). For each:

* keeping every unit in a random order reproduces the outputs (the permutation check);
* a random ratio compresses, verifies and gives finite outputs of the original shape;
* GRAIL never reconstructs a consumer worse than plain pruning, and the safety net that refuses a worse map only
  fires where the removed channels carry almost nothing (the ridge's bias then outweighs what is rebuilt).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import grailc

SIDE = 8


class ConvBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = ConvBlock(c, c), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.b(self.a(x))


class ConcatSplit(nn.Module):
    """Two branches concatenated, split back in another order, and mixed."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b, self.mix = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c, c - c // 2, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        first, second = y.split([y.shape[1] // 2, y.shape[1] - y.shape[1] // 2], 1)
        return self.mix(torch.cat([second, first], 1))


class Depthwise(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=groups)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.pw(F.gelu(self.dw(x)))


class ShuffleUnit(nn.Module):
    """ShuffleNet v2: the first half passes, the second goes through a branch, then a channel shuffle of g groups."""

    def __init__(self, c, groups):
        super().__init__()
        self.groups = groups
        h = c // 2
        self.branch = nn.Sequential(nn.Conv2d(h, h, 1), nn.BatchNorm2d(h), nn.ReLU(),
                                    nn.Conv2d(h, h, 3, padding=1, groups=h), nn.Conv2d(h, h, 1))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = y.shape
        return y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ChannelsLastMLP(nn.Module):
    """ConvNeXt-style: permute to channels-last, LayerNorm-free MLP with a layer scale, permute back, residual."""

    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.scale = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y))) * self.scale
        return x + y.permute(0, 3, 1, 2)


class AttentionBlock(nn.Module):
    """Tokens from the feature map, fused-qkv multi-head attention (or the explicit softmax form), back to a map."""

    def __init__(self, c, heads, explicit):
        super().__init__()
        self.heads, self.explicit = heads, explicit
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.explicit:
            a = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        t = t + self.proj(a.transpose(1, 2).reshape(b, h * w, c))
        return t.transpose(1, 2).reshape(b, c, h, w)


def block(kind: str, c: int, param: int) -> nn.Module:
    if kind == "conv":
        return ConvBlock(c, c)
    if kind == "residual":
        return Residual(c)
    if kind == "concat":
        return ConcatSplit(c)
    if kind == "depthwise":
        return Depthwise(c, c if param % 2 else 2)
    if kind == "mlp":
        return ChannelsLastMLP(c)
    if kind == "shuffle":
        return ShuffleUnit(c, 4 if param % 2 else 2)
    return AttentionBlock(c, heads=2 if param % 2 else 4, explicit=kind == "attention_explicit")


class RandomNet(nn.Module):
    def __init__(self, kinds, width, params, flatten_head):
        super().__init__()
        self.stem = ConvBlock(3, width)
        self.body = nn.Sequential(*[block(k, width, p) for k, p in zip(kinds, params)])
        self.flatten_head = flatten_head
        self.head = nn.Linear(width * (4 if flatten_head else 1), 5)

    def forward(self, x):
        y = self.body(self.stem(x))
        if self.flatten_head:
            return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 2), 1))
        return self.head(y.mean((2, 3)))


KINDS = ["conv", "residual", "concat", "depthwise", "shuffle", "mlp", "attention", "attention_explicit"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=4),
    width=st.sampled_from([8, 12, 16]),
    seed=st.integers(0, 1000),
    ratio=st.floats(0.1, 0.7),
    flatten_head=st.booleans(),
)
def test_random_networks_check_themselves_and_grail_never_loses(kinds, width, seed, ratio, flatten_head):
    torch.manual_seed(seed)
    params = torch.randint(0, 10, (len(kinds),)).tolist()
    model = RandomNet(kinds, width, params, flatten_head).eval()
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(4, 3, SIDE, SIDE, generator=g) for _ in range(4)]
    result = grailc.compress(model, calib=batches, ratio=ratio, calib_held_out=1)
    report = result.report
    assert report["verification"]["permutation_error"] <= 1e-5
    assert report["verification"]["permuted_groups"] >= 1
    with torch.no_grad():
        out = result.module(batches[0])
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    for grp in report["groups"]:
        if grp["kept"] < grp["size"] and grp["recon_error_plain"] is not None:
            assert grp["recon_error_grail"] <= grp["recon_error_plain"] * (1 + 1e-6) + 1e-9
            # the ridge may lose to plain pruning only where the removed channels carry almost nothing
            assert not grp["compensation_refused"] or grp["recon_error_plain"] < 1e-2, grp
    if any(k.startswith("attention") for k in kinds):
        assert any(grp["kind"] == "heads" for grp in report["groups"])
