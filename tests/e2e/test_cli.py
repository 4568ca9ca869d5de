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
from two_inputs import ConvWithScale, TokensWithMask, ids_and_mask, image_and_scale

from grailc.cli import main
from grailc.loading import file_sha256
from grailc.report import summary

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
    # the default solves the 3x3 consumers of pruned groups over their taps (8 here; the rest at 64 px with 18
    # images have fewer positions than kept (channel, tap) pairs), and the summary says so
    taps, few = report["kernel_taps"], report["kernel_taps_few_rows"]
    assert report["recipe"]["kernel_solve"] == "taps" and len(taps) >= 6 and not set(taps) & set(few)
    assert f"kernel taps: {len(taps)} k x k convolution consumers solved" in summary(report)

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


def _registered(table: str) -> list[str]:
    import grailc.registry as registry

    registry.load_builtin()
    return sorted(getattr(registry, table))


@pytest.mark.parametrize("selector", _registered("SELECTORS"))
@pytest.mark.parametrize("compensate", _registered("COMPENSATORS"))
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


def test_stream_target_on_a_vit_rebuilds_the_residual_stream(tmp_path, capsys):
    """The attention's output projection and the MLP's second linear add into the ViT's residual stream."""
    from grailc.models.fashion_vit import FashionViT

    model_path = tmp_path / "vit.pt2"
    torch.export.save(torch.export.export(FashionViT(depth=2).eval(), (torch.randn(2, 1, 28, 28),)), str(model_path))
    out = tmp_path / "out"
    code = main(["compress", str(model_path), "--calib", "random", "--calib-batches", "3", "--batch-size", "32",
                 "--held-out", "1", "--ratio", "0.5", "--targets", "mlp,heads", "--compensate-target", "stream",
                 "--out", str(out)])  # 64 images x 50 tokens: 32 rows per kept channel (96 of 192)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert len(report["stream_writers"]) == 4  # two blocks: attention projection and MLP fc2 each
    assert "stream target: 4 consumers" in captured.out and "rebuild the dense stream" in captured.out
    # plain pruning rebuilds nothing: the summary says what the stream target then means
    code = main(["compress", str(model_path), "--calib", "random", "--calib-batches", "3", "--batch-size", "32",
                 "--held-out", "1", "--ratio", "0.5", "--targets", "mlp,heads", "--compensate", "none",
                 "--no-onnx", "--out", str(tmp_path / "plain")])
    captured = capsys.readouterr()
    assert code == 0 and "measured against the dense stream (nothing compensates)" in captured.out
    assert report["recipe"]["compensate_target"] == "stream"
    assert report["onnx"]["relative_diff"] < 1e-3


@pytest.mark.parametrize("selector", ["auto", "fold"])
def test_shufflenet_prunes_through_its_channel_shuffles(selector, tmp_path, capsys):
    """Every branch width prunes; where a shuffle spreads a group's channels apart, fold keeps cluster medoids."""
    out = tmp_path / "out"
    code = main(["compress", "torchvision:shufflenet_v2_x0_5", "--calib", "random", "--input-shape", "1,3,64,64",
                 "--calib-batches", "2", "--batch-size", "4", "--held-out", "1", "--ratio", "0.5",
                 "--selector", selector, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    shuffled = [g for g in report["groups"] if g["shuffled"] and g["kept"] < g["size"]]
    assert len(shuffled) > 20 and all(g["map"] == "select" for g in shuffled)
    assert report["params_after"] < 0.6 * report["params_before"]
    assert report["verification"]["permutation_error"] <= 1e-5 and report["onnx"]["relative_diff"] < 1e-3


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


def check_two_input_outputs(out, batch):
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["permutation_error"] <= 1e-5
    assert report["params_after"] < report["params_before"]
    assert report["onnx"]["relative_diff"] < 1e-3
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), batch)})[0]
    pt2_out = torch.export.load(str(out / "model.pt2")).module()(*batch).detach().numpy()
    np.testing.assert_allclose(onnx_out, pt2_out, atol=1e-4, rtol=1e-3)
    return report


def test_two_inputs_with_random_calibration(tmp_path, capsys):
    model_path = tmp_path / "scaled.pt2"
    torch.export.save(torch.export.export(ConvWithScale().eval(), image_and_scale(batch=2)[0]), str(model_path))
    shapes = ["--input-shape", "1,3,8,8", "--input-shape", "1,1"]
    assert main(["groups", str(model_path), *shapes]) == 0
    out = tmp_path / "out"
    code = main(["compress", str(model_path), "--calib", "random", *shapes, "--calib-batches", "3", "--batch-size",
                 "4", "--held-out", "1", "--ratio", "0.5", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = check_two_input_outputs(out, image_and_scale(batch=3, count=1)[0])
    assert report["recipe"]["input_shape"] == [[1, 3, 8, 8], [1, 1]] and report["data_free"]


def test_two_inputs_from_a_pt_file_of_token_ids_and_masks(tmp_path, capsys):
    model_path = tmp_path / "tokens.pt2"
    torch.export.save(torch.export.export(TokensWithMask().eval(), ids_and_mask(batch=2)[0]), str(model_path))
    calib = tmp_path / "calib.pt"
    torch.save(tuple(torch.cat(column) for column in zip(*ids_and_mask())), calib)  # (ids, mask), 12 samples
    out = tmp_path / "out"
    code = main(["compress", str(model_path), "--calib", str(calib), "--calib-batches", "3", "--batch-size", "4",
                 "--held-out", "1", "--ratio", "0.5", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = check_two_input_outputs(out, ids_and_mask(batch=3, count=1)[0])
    assert report["recipe"]["input_shape"] == [[1, 6], [1, 6]]
    assert report["calibration"]["source"] == f"tensor: {calib} (12 samples)"


def test_one_input_shape_for_a_two_input_model_is_refused(tmp_path, capsys):
    model_path = tmp_path / "scaled.pt2"
    torch.export.save(torch.export.export(ConvWithScale().eval(), image_and_scale(batch=2)[0]), str(model_path))
    code = main(["compress", str(model_path), "--calib", "random", "--input-shape", "1,3,8,8",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "1 input shape(s) given, but the model takes 2 input(s) (x, scale)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class BnNet(torch.nn.Module):
    """conv-BN-ReLU twice without conv biases, then pooling and a linear head."""

    def __init__(self):
        super().__init__()
        conv = lambda i, o: torch.nn.Conv2d(i, o, 3, padding=1, bias=False)  # noqa: E731
        self.body = torch.nn.Sequential(conv(1, 8), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), conv(8, 8),
                                        torch.nn.BatchNorm2d(8), torch.nn.ReLU(), conv(8, 8), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("selector,compensate,extra", [("random", "grail+bias", []),
                                                        ("wanda", "bias", ["--sequential"])])
def test_random_selector_bias_compensation_and_repair(selector, compensate, extra, tmp_path, capsys):
    """A bias is added to consumers that had none, BatchNorm statistics are repaired, ONNX agrees."""
    model_path = tmp_path / "bn.pt2"
    torch.export.save(torch.export.export(BnNet().eval(), (torch.randn(2, 1, 12, 12),)), str(model_path))
    out = tmp_path / "out"
    code = main(["compress", str(model_path), "--calib", "random", "--calib-batches", "3", "--batch-size", "4",
                 "--held-out", "1", "--ratio", "0.5", "--selector", selector, "--compensate", compensate, "--repair",
                 "--seed", "3", "--out", str(out), "--quiet", *extra])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["selector"] == selector and report["recipe"]["compensate"] == compensate
    assert report["recipe"]["pipeline"] == ["analyse", "calibrate", "select", "compensate", "apply", "repair",
                                            "verify"]
    assert report["repair"]["batch_norms"] == 3 and report["onnx"]["max_abs_diff"] < 1e-3
    pruned = [g for g in report["groups"] if g["kept"] < g["size"]]
    assert pruned and all(g["recon_error_grail"] <= g["recon_error_plain"] for g in pruned)
    params = dict(torch.export.load(str(out / "model.pt2")).module().named_parameters())
    assert params["body.3.bias"].shape == (4,) and params["body.6.bias"].shape == (4,)


@pytest.mark.parametrize("compensate", _registered("COMPENSATORS"))
def test_every_compensator_solves_3x3_consumers_over_their_taps(compensate, tmp_path, capsys):
    """The default sequential pipeline solves BnNet's two 3x3 consumers over (channel, tap) pairs with every
    compensator (none has nothing to solve), the summary says so, and the model exported agrees with ONNX."""
    model_path = tmp_path / "bn.pt2"
    torch.export.save(torch.export.export(BnNet().eval(), (torch.randn(2, 1, 12, 12),)), str(model_path))
    out = tmp_path / "out"
    code = main(["compress", str(model_path), "--calib", "random", "--calib-batches", "3", "--batch-size", "4",
                 "--held-out", "1", "--ratio", "0.5", "--compensate", compensate, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["kernel_solve"] == "taps"
    assert report.get("kernel_taps", []) == ([] if compensate == "none" else ["conv2d_1", "conv2d_2"])
    assert ("kernel taps: 2 k x k convolution consumers solved" in captured.out) == (compensate != "none")
    assert report["onnx"]["max_abs_diff"] < 1e-3
    pruned = [g for g in report["groups"] if g["kept"] < g["size"]]
    assert pruned and all(g["recon_error_grail"] is None or g["recon_error_grail"] <= g["recon_error_plain"]
                          for g in pruned)


def test_repair_reports_nothing_to_repair_without_batch_norm(tmp_path, capsys):
    from grailc.models.fashion_vit import FashionViT

    model_path = tmp_path / "vit.pt2"
    torch.export.save(torch.export.export(FashionViT(depth=1).eval(), (torch.randn(2, 1, 28, 28),)), str(model_path))
    out = tmp_path / "out"
    code = main(["compress", str(model_path), "--calib", "random", "--calib-batches", "3", "--batch-size", "4",
                 "--held-out", "1", "--ratio", "0.5", "--repair", "--no-onnx", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["repair"]["batch_norms"] == 0 and "nothing to repair" in report["repair"]["note"]


def test_demo_compresses_the_embedded_model_and_reports_accuracy(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--ratio", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GRAIL --one-shot" in printed and "sequential, the default" in printed
    accuracy = json.loads((out / "report.json").read_text())["accuracy"]
    assert accuracy["dense"] > 0.9
    assert accuracy["grail"] > accuracy["grail_one_shot"] > accuracy["plain"] + 0.3
    assert {"model.onnx", "model.pt2", "report.json"} <= {p.name for p in out.iterdir()}


def test_demo_refuses_an_existing_output_folder_before_the_work(tmp_path, capsys, monkeypatch):
    import grailc.demo

    def must_not_run():
        raise AssertionError("the demo started compressing despite the existing output folder")

    monkeypatch.setattr(grailc.demo, "load_pretrained", must_not_run)
    out = tmp_path / "demo"
    out.mkdir()
    assert main(["demo", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.is_dir()


def test_groups_shows_the_rows_of_split_producers(capsys):
    assert main(["groups", "torchvision:shufflenet_v2_x0_5", "--input-shape", "1,3,64,64"]) == 0
    out = capsys.readouterr().out
    assert "stage2.0.branch1.2[12:24]" in out and "stage2.0.branch1.2[0:3]" in out
    assert out.strip().splitlines()[-1] == "88 groups, 86 prunable"


@pytest.mark.parametrize("flag, wide_kept", [([], 64), (["--multiple-of", "1"], 67)])
def test_kept_widths_round_to_eight_in_wide_groups_by_default(flag, wide_kept, tmp_path, capsys):
    """multiple_of auto: a 96-channel group at ratio 0.3 keeps 64 (67 rounded to a multiple of 8), a 40-channel one
    its exact 28; --multiple-of 1 keeps 67. Either way the model exports and matches PyTorch. The convolutions off
    ONNX Runtime's 16-channel CPU block are counted (the 40 already was), and the summary names a new one."""
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(), nn.Conv2d(96, 40, 1),
                        nn.ReLU(), nn.Conv2d(40, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    model_path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 3, 16, 16),)), str(model_path))
    out = tmp_path / "out"
    code = main(["compress", str(model_path), "--calib", "random", "--calib-batches", "3", "--batch-size", "4",
                 "--held-out", "1", "--ratio", "0.3", *flag, "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    kept = {g["size"]: g["kept"] for g in report["groups"] if g["pinned"] is None}
    assert kept == {96: wide_kept, 40: 28}
    off = 1 if wide_kept == 64 else 2  # 28 (and 67)
    assert report["cpu_block"] == {"block": 16, "convs": 3, "not_multiple_before": 1, "not_multiple_after": off}
    hint = ("CPU speed: 2 of 3 convolutions have widths that are not a multiple of 16 (dense: 1), which ONNX "
            "Runtime's CPU runs outside its blocked layout; --multiple-of 16 rounds every kept width")
    assert (hint in capsys.readouterr().out) is (off == 2)
    assert report["recipe"]["multiple_of"] == ("auto" if not flag else 1)
    assert report["onnx"]["relative_diff"] < 1e-4 and report["verification"]["permutation_error"] <= 1e-5
