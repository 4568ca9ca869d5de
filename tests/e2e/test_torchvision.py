"""torchvision architectures end to end: compress, verify, export to ONNX and .pt2, reload (random weights)."""

from __future__ import annotations

import pytest
import torch
import torchvision

import grailc

MODELS = ["resnet18", "vgg11_bn", "mobilenet_v2", "densenet121", "shufflenet_v2_x0_5"]


def random_batches(count=3, batch=4, side=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, side, side, generator=g) for _ in range(count)]


@pytest.mark.parametrize("name", MODELS)
def test_compress_verify_export_reload(name, tmp_path):
    model = torchvision.models.get_model(name, weights=None).eval()
    result = grailc.compress(model, calib=random_batches(), ratio=0.5, calib_held_out=1)
    report = result.report
    assert report["verification"]["permutation_error"] <= 1e-5
    assert report["params_after"] < 0.6 * report["params_before"]
    assert report["macs_after"] < 0.6 * report["macs_before"]
    assert torch.isfinite(torch.tensor(report["output_error"]["relative_l2"]))
    pruned = [g for g in report["groups"] if g["kept"] < g["size"]]
    assert pruned and all(g["pinned"] is None for g in pruned)
    assert all(g["kept"] == round(g["size"] * 0.5) for g in pruned)
    plain = sum(g["recon_error_plain"] for g in pruned)
    grail = sum(g["recon_error_grail"] for g in pruned)
    assert grail < plain  # compensation reconstructs the consumers better than plain pruning

    out = result.save(tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.pt2", "report.json"}
    assert report["onnx"]["relative_diff"] < 1e-3
    reloaded = torch.export.load(str(out / "model.pt2")).module()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.module(x), atol=1e-5, rtol=1e-4)


def test_ratio_zero_reproduces_the_model():
    model = torchvision.models.resnet18(weights=None).eval()
    result = grailc.compress(model, calib=random_batches(), ratio=0.0, calib_held_out=1)
    assert result.report["output_error"]["relative_l2"] < 1e-5
    assert result.report["params_after"] == result.report["params_before"]
