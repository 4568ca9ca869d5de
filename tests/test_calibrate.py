"""Calibration's statistics (passes/calibrate.py): consumers that read the same rows share one Gram, unless an
in-place op may change the tensor between their reads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from grailc.passes.calibrate import record_grams, shared_rows
from graph_checks import traced
from torch import nn


class Branches(nn.Module):
    """Three 1x1 convs read the stem's output (an Inception block's branches); with ``in_place`` the third reads it
    after ``relu_`` rewrote it."""

    def __init__(self, in_place: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b, self.c = (nn.Conv2d(8, 4, 1) for _ in range(3))
        self.in_place = in_place

    def forward(self, x):
        h = self.stem(x)
        a, b = self.a(h), self.b(h)
        if self.in_place:
            h.relu_()
        return torch.cat([a, b, self.c(h)], 1)


def stem_group(deps):
    return next(g for g in deps.prunable() if "stem" in g.modules())


def test_consumers_of_one_tensor_share_their_gram():
    torch.manual_seed(0)
    model = Branches().eval()
    gm, deps = traced(model, (2, 3, 6, 6))
    group = stem_group(deps)
    source = shared_rows(gm, [group])
    assert len(source) == 3 and len(set(source.values())) == 1
    data = [(torch.randn(4, 3, 6, 6),) for _ in range(3)]
    sums: dict = {}
    grams, rows = record_grams(gm, [group], data, sums=sums)
    h = torch.cat([model.stem(x) for (x,) in data]).detach().movedim(1, -1).reshape(-1, 8).to(torch.float64)
    for key in source:
        torch.testing.assert_close(grams[key], h.T @ h, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sums[key], h.sum(0), rtol=1e-5, atol=1e-5)
        assert rows[key] == h.shape[0]
    assert len({id(g) for g in grams.values()}) == 3  # copies, not one tensor under three names


def test_a_tensor_rewritten_in_place_between_its_consumers_is_not_shared():
    torch.manual_seed(0)
    model = Branches(in_place=True).eval()
    gm, deps = traced(model, (2, 3, 6, 6))
    group = stem_group(deps)
    assert len(set(shared_rows(gm, [group]).values())) == 3
    data = [(torch.randn(4, 3, 6, 6),) for _ in range(3)]
    grams, _ = record_grams(gm, [group], data)
    h = torch.cat([model.stem(x) for (x,) in data]).detach().movedim(1, -1).reshape(-1, 8).to(torch.float64)
    relu = F.relu(h)
    keys = sorted(grams)
    assert sum(torch.allclose(grams[k], h.T @ h, rtol=1e-5, atol=1e-4) for k in keys) == 2
    assert sum(torch.allclose(grams[k], relu.T @ relu, rtol=1e-5, atol=1e-4) for k in keys) == 1
