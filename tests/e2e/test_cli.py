"""The command line as a user runs it: a .pt2 model, a folder of real photos, the files and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from photos import photos, random_crops
from PIL import Image

from grailc.cli import main
from grailc.loading import file_sha256

REPORT_KEYS = {"params_before", "params_after", "macs_before", "macs_after", "groups", "output_error", "onnx",
               "timings", "command", "versions", "unknown_ops", "verification", "recipe", "calibration"}
GROUP_KEYS = {"id", "kind", "size", "kept", "pinned", "producers", "consumers", "recon_error_plain",
              "recon_error_grail"}


def image_folder(path, count=24):
    path.mkdir()
    crops = random_crops(photos(), count, size=96)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for i, crop in enumerate(crops):
        pixels = ((crop * std + mean).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(path / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    return path


def test_compress_pt2_with_image_folder(tmp_path, capsys):
    model = torchvision.models.resnet18(weights=None).eval()
    model_path = tmp_path / "resnet18.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 64, 64),)), str(model_path))
    before = file_sha256(model_path)
    images = image_folder(tmp_path / "images")
    out = tmp_path / "out"
    code = main(["compress", str(model_path), "--calib", str(images), "--calib-batches", "4", "--batch-size", "6",
                 "--held-out", "1", "--ratio", "0.5", "--selector", "wanda", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert file_sha256(model_path) == before
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt2", "report.json"]

    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["recipe"]["input_shape"] == [1, 3, 64, 64]
    assert report["calibration"]["source"].startswith("images:") and not report["data_free"]
    assert all(GROUP_KEYS <= set(g) for g in report["groups"])
    pruned = [g for g in report["groups"] if g["kept"] < g["size"]]
    assert len(pruned) == 12 and all(g["recon_error_grail"] <= g["recon_error_plain"] for g in pruned)
    assert report["onnx"]["path"] == "model.onnx" and report["onnx"]["max_abs_diff"] < 1e-3
    assert report["verification"]["permutation_error"] <= 1e-5
    assert {"trace", "calibrate", "select", "compensate", "apply", "verify", "export"} <= set(report["timings"])
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]

    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
    pt2_out = torch.export.load(str(out / "model.pt2")).module()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(onnx_out, pt2_out, atol=1e-4, rtol=1e-3)


def test_console_script_and_recipe(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('ratio = 0.25\nselector = "magnitude"\nexclude = ["layer4.*"]\n[ratios]\n"layer1.*" = 0.5\n'
                      '[calib]\nsource = "random"\nbatches = 3\nbatch_size = 2\nheld_out = 1\n')
    out = tmp_path / "out"
    grailc = Path(sys.executable).parent / "grailc"  # the installed console script
    done = subprocess.run([str(grailc), "compress", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--recipe",
                           str(recipe), "--no-onnx", "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["data_free"] is True
    groups = {tuple(g["producers"]): g for g in report["groups"]}
    layer1 = next(g for p, g in groups.items() if "layer1.0.conv1" in p)
    layer3 = next(g for p, g in groups.items() if "layer3.0.conv1" in p)
    layer4 = next(g for p, g in groups.items() if "layer4.0.conv1" in p)
    assert layer1["kept"] == 32 and layer3["kept"] == 192
    assert layer4["kept"] == layer4["size"] and "excluded by recipe pattern" in layer4["pinned"]
    assert not (out / "model.onnx").exists()


def test_groups_lists_what_prunes_together_and_what_is_pinned(capsys):
    assert main(["groups", "torchvision:regnet_x_400mf", "--input-shape", "1,3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "pinned: model output" in out
    # grouped convs tie their input and output blocks: the groups through them prune whole blocks of channels
    rows = [line.split() for line in out.splitlines()[1:] if line.split() and line.split()[0].isdigit()]
    assert any(int(r[3]) > 1 for r in rows if r[1] == "conv")
    assert out.strip().splitlines()[-1] == "29 groups, 27 prunable"


@pytest.mark.parametrize("selector", ["magnitude", "wanda"])
@pytest.mark.parametrize("compensate", ["grail", "none"])
def test_every_selector_and_compensator_prints_its_summary(selector, compensate, tmp_path, capsys):
    """Plain pruning has no compensated error: the summary says so instead of failing after the files exist."""
    from grailc.models.fashion_vit import FashionViT

    model_path = tmp_path / "vit.pt2"
    torch.export.save(torch.export.export(FashionViT(depth=1).eval(), (torch.randn(2, 1, 28, 28),)), str(model_path))
    out = tmp_path / "out"
    code = main(["compress", str(model_path), "--calib", "random", "--calib-batches", "3", "--batch-size", "4",
                 "--held-out", "1", "--ratio", "0.5", "--selector", selector, "--compensate", compensate,
                 "--targets", "mlp,heads", "--multiple-of", "8", "--no-onnx", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "attention: 2 of 4 heads kept" in captured.out
    assert ("no compensation" in captured.out) == (compensate == "none")
    report = json.loads((out / "report.json").read_text())
    mlp = next(g for g in report["groups"] if g["kind"] == "linear" and g["kept"] < g["size"])
    assert mlp["kept"] % 8 == 0


def test_a_failure_after_the_outputs_exist_says_so(tmp_path, capsys, monkeypatch):
    """An error after the output folder is committed must not claim that nothing was written."""
    from grailc.models.fashion_vit import FashionViT

    model_path = tmp_path / "vit.pt2"
    torch.export.save(torch.export.export(FashionViT(depth=1).eval(), (torch.randn(2, 1, 28, 28),)), str(model_path))
    out = tmp_path / "out"
    listing = Path.iterdir

    def broken_listing(self):
        if self == out:
            raise RuntimeError("listing failed")
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", broken_listing)
    code = main(["compress", str(model_path), "--calib", "random", "--calib-batches", "3", "--batch-size", "4",
                 "--held-out", "1", "--ratio", "0.5", "--no-onnx", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 4
    assert f"the outputs in {out} were written before it" in err and "nothing was written" not in err
    assert (out / "report.json").is_file()
