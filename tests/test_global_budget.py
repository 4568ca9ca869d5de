"""Global budget: the planned counts meet the parameter / MAC target, respect the floor and the per-module ratios,
and an impossible target is refused with what is achievable."""

from __future__ import annotations

import json

import pytest
import torch
from grailc.passes.select.global_budget import parse_budget

import grailc
from grailc.cli import main
from grailc.errors import RecipeError
from grailc.models.fashion_resnet import FashionResNet


def _model():
    torch.manual_seed(0)
    return FashionResNet().eval()


def _calib():
    return [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(3)]


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_the_budget_is_met_and_spread_unevenly(kind):
    result = grailc.compress(_model(), calib=_calib(), budget=f"{kind}=0.6", calib_held_out=1,
                             measure_latency=False)
    report = result.report
    kept = report[f"{kind}_after"] / report[f"{kind}_before"]
    assert 0.37 <= kept <= 0.40, kept  # the cost model is exact for convs, linears and carriers
    fractions = {g["kept"] / g["size"] for g in report["groups"] if g["pinned"] is None}
    assert len(fractions) > 1  # not one ratio everywhere
    assert min(fractions) >= 0.1


def test_floor_and_per_module_ratio_are_respected():
    result = grailc.compress(_model(), calib=_calib(), budget="params=0.5", budget_floor=0.4, calib_held_out=1,
                             ratios={"layer1.*": 0.25}, measure_latency=False)
    for g in result.report["groups"]:
        if g["pinned"] is None:
            assert g["kept"] >= 0.4 * g["size"]
            if any(p.startswith("layer1.") for p in g["producers"]):
                assert g["kept"] == round(0.75 * g["size"])


def test_an_impossible_budget_says_what_is_achievable():
    with pytest.raises(RecipeError, match="cannot be met.*keeps"):
        grailc.compress(_model(), calib=_calib(), budget="params=0.99", calib_held_out=1, measure_latency=False)
    for text in ("params", "flops=0.5", "params=1.5", "macs=abc"):
        with pytest.raises(RecipeError, match="cannot read the budget"):
            parse_budget(text)


def test_budget_through_the_cli(tmp_path, capsys):
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(_model(), (torch.randn(2, 1, 28, 28),)), str(path))
    out = tmp_path / "out"
    code = main(["compress", str(path), "--calib", "random", "--calib-batches", "3", "--batch-size", "4",
                 "--held-out", "1", "--budget", "macs=0.5", "--budget-floor", "0.2", "--sequential", "--no-onnx",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert 0.47 <= report["macs_after"] / report["macs_before"] <= 0.51
    assert main(["compress", str(path), "--calib", "random", "--budget", "params=2", "--out", str(tmp_path / "x")]) == 2
    assert "cannot read the budget" in capsys.readouterr().err
