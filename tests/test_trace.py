"""Tracing corner cases: models fixed to one batch size, and literal sizes in views that follow pruning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grailc
from grailc.errors import RecipeError
from grailc.trace import capture, static_batch


class FixedBatch(nn.Module):
    """Written for batch 1 only: ``view(1, -1)``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.b(self.a(x).relu()).relu().view(1, -1))


class LiteralView(nn.Module):
    """``view(-1, 8 * 16)``: the literal channel size must follow the pruned width."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 5)

    def forward(self, x):
        return self.fc(self.a(x).relu().view(-1, 8 * 16))


def batches(batch=4, count=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(count)]


def test_fixed_batch_model_is_traced_static_and_fed_its_batch(tmp_path):
    gm, example = capture(FixedBatch().eval(), (1, 3, 8, 8))
    assert static_batch(gm) == 1 and example.shape[0] == 1
    result = grailc.compress(FixedBatch().eval(), input_shape=[1, 3, 8, 8], calib=batches(), ratio=0.5,
                             calib_held_out=1)
    assert result.report["verification"]["permutation_error"] <= 1e-5
    assert [g["kept"] for g in result.report["groups"] if g["pinned"] is None] == [4, 4]
    result.save(tmp_path / "out")
    assert result.report["onnx"]["relative_diff"] < 1e-3


def test_literal_view_size_follows_the_pruned_width(tmp_path):
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, 4, 4, generator=g) for _ in range(3)]
    result = grailc.compress(LiteralView().eval(), calib=calib, ratio=0.5, calib_held_out=1)
    views = [n for n in result.module.graph.nodes if "view" in str(n.target)]
    assert [n.args[1][-1] for n in views] == [4 * 16]
    assert result.report["params_after"] < result.report["params_before"]
    result.save(tmp_path / "out")
    assert result.report["onnx"]["relative_diff"] < 1e-3


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, mask):
        return self.fc(x) * mask


def test_a_model_with_two_inputs_is_refused_for_what_it_is():
    with pytest.raises(RecipeError, match=r"takes 2 inputs \(x, mask\)"):
        grailc.compress(TwoInputs(), calib=[torch.randn(2, 4)])
