"""Requirement 3: NaN/Inf are caught where they appear, singular systems fall back, bad compensation is refused,
and half-precision models compress (float64 Grams) and come back in their own dtype."""

from __future__ import annotations

import json

import grailc.passes.calibrate as calibrate
import numpy as np
import pytest
import torch

import grailc
from grailc.errors import CalibrationError

from .helpers import FAST, INPUT_SHAPE, LogOfNegatives, assert_one_error_line, model_files, run_cli, save_pt2, tiny


def batches(count: int = 3, size: int = 4, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *INPUT_SHAPE[1:], generator=generator) for _ in range(count)]


def test_nan_in_calibration_file_names_the_sample(tmp_path, capfd):
    data = np.random.default_rng(0).standard_normal((12, 3, 32, 32)).astype(np.float32)
    data[5, 1, 7, 7] = np.nan
    data[9, 0, 0, 0] = np.inf
    np.save(tmp_path / "inputs.npy", data)
    path = save_pt2(tiny(), tmp_path / "m.pt2")

    code, lines = run_cli([path, *FAST, "--calib", tmp_path / "inputs.npy", "--out", tmp_path / "out"], capfd)

    assert code == 2
    assert_one_error_line(lines, "2 NaN/Inf", "sample 5", "inputs.npy")
    assert not (tmp_path / "out").exists()


def test_nan_in_calibration_batches_names_batch_and_sample():
    data = batches()
    data[1][2, 0, 3, 3] = float("nan")
    with pytest.raises(CalibrationError, match=r"batch 1 .*sample 2"):
        grailc.compress(tiny(), input_shape=INPUT_SHAPE, calib=data, onnx=False)


def test_nan_weight_is_reported_with_the_parameter(tmp_path, capfd):
    model = tiny()
    with torch.no_grad():
        model.conv2.weight[3, 1, 0, 0] = float("nan")
    path = save_pt2(model, tmp_path / "m.pt2")

    code, lines = run_cli([path, *FAST, "--out", tmp_path / "out"], capfd)

    assert code == 2
    assert_one_error_line(lines, "NaN/Inf", "conv2.weight")


def test_nan_inside_the_network_is_reported_with_the_node(tmp_path, capfd):
    path = save_pt2(tiny(cls=LogOfNegatives), tmp_path / "m.pt2")
    code, lines = run_cli([path, *FAST, "--out", tmp_path / "out"], capfd)
    assert code == 2
    assert_one_error_line(lines, "NaN/Inf", "node log", "aten.log")


def test_singular_gram_falls_back_and_is_counted(tmp_path, capfd):
    """Half of conv1's channels are identically zero: kept zero channels make G[K, K] singular with lam = 0."""
    model = tiny()
    with torch.no_grad():
        model.conv1.weight[:4] = 0
        model.conv1.bias[:4] = 0
        model.bn1.running_mean.zero_()
    path = save_pt2(model, tmp_path / "m.pt2")
    out = tmp_path / "out"

    code, lines = run_cli([path, *FAST, "--lam", "0", "--ratio", "0.25", "--selector", "magnitude", "--out", out],
                          capfd)

    assert code == 0, lines
    report = json.loads((out / "report.json").read_text())
    assert report["solver_fallbacks"] > 0
    conv1_group = next(g for g in report["groups"] if g["producers"] == ["conv1"])
    assert conv1_group["solver_fallbacks"] > 0 and conv1_group["kept"] == 6
    assert report["verification"]["permutation_error"] <= 1e-5
    assert np.isfinite(report["output_error"]["relative_l2"])
    assert (out / "model.pt2").exists()


def test_compensation_worse_than_pruning_is_refused(tmp_path, capfd, monkeypatch):
    """GRAIL's ridge pulls towards plain pruning, so it is never worse on the calibration data; the guard holds
    for any compensator, here a plug-in that flips the sign of the kept channels."""
    from grailc.registry import COMPENSATORS, load_builtin
    def flipped(stats, cmap, lam):
        return -cmap.U(), None, None

    load_builtin()
    monkeypatch.setitem(COMPENSATORS, "flipped", flipped)
    path = save_pt2(tiny(), tmp_path / "m.pt2")
    out = tmp_path / "out"

    code, lines = run_cli([path, *FAST, "--compensate", "flipped", "--out", out], capfd)

    assert code == 0, lines
    report = json.loads((out / "report.json").read_text())
    assert report["compensation_refused"] > 0
    refused = [g for g in report["groups"] if g["compensation_refused"]]
    assert refused
    for g in refused:  # a refused group keeps plain pruning's error
        assert g["recon_error_grail"] == pytest.approx(g["recon_error_plain"])


@pytest.fixture
def gram_dtypes(monkeypatch):
    """The dtypes of every Gram matrix calibration records."""
    seen = set()
    one_shot, sequential = calibrate.record_grams, calibrate.record_consumer_inputs

    def recording(*args, **kwargs):
        grams, rows = one_shot(*args, **kwargs)
        seen.update(g.dtype for g in grams.values())
        return grams, rows

    def recording_cross(*args, **kwargs):
        found = sequential(*args, **kwargs)
        seen.update(g.dtype for name in ("gz", "cross", "sample_gx") for g in found[name].values())
        return found

    monkeypatch.setattr(calibrate, "record_grams", recording)
    monkeypatch.setattr(calibrate, "record_consumer_inputs", recording_cross)
    return seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_module_through_the_api(dtype, gram_dtypes):
    model = tiny().to(dtype)
    data = batches()

    result = grailc.compress(model, input_shape=INPUT_SHAPE, calib=data, calib_held_out=1, onnx=False)

    assert gram_dtypes == {torch.float64}
    assert {p.dtype for p in result.module.parameters()} == {dtype}
    assert result.report["verification"]["permutation_error"] <= 1e-5
    assert np.isfinite(result.report["output_error"]["relative_l2"])
    with torch.no_grad():
        y = result.module(data[-1].to(dtype))
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    assert result.report["params_after"] < result.report["params_before"]


def test_float16_pt2_through_the_cli_with_onnx(tmp_path, capfd, gram_dtypes):
    path = save_pt2(tiny(), tmp_path / "m.pt2", dtype=torch.float16)
    out = tmp_path / "out"
    flags = [f for f in FAST if f != "--no-onnx"]

    code, lines = run_cli([path, *flags, "--out", out], capfd)

    assert code == 0, lines
    assert gram_dtypes == {torch.float64}
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["relative_diff"] <= report["onnx"]["tolerance"]
    assert np.isfinite(report["output_error"]["relative_l2"])
    program = torch.export.load(str(out / "model.pt2"))
    assert {t.dtype for t in program.state_dict.values() if t.is_floating_point()} == {torch.float16}


def test_bfloat16_pt2_skips_onnx_with_a_note(tmp_path, capfd):
    path = save_pt2(tiny(), tmp_path / "m.pt2", dtype=torch.bfloat16)
    out = tmp_path / "out"
    flags = [f for f in FAST if f != "--no-onnx"]

    code, lines = run_cli([path, *flags, "--out", out], capfd)

    assert code == 0, lines
    report = json.loads((out / "report.json").read_text())
    assert "bfloat16" in report["onnx"]["skipped"]
    assert model_files(out) == ["model.pt2"]
    program = torch.export.load(str(out / "model.pt2"))
    assert {t.dtype for t in program.state_dict.values() if t.is_floating_point()} == {torch.bfloat16}
    y = program.module()(torch.randn(2, *INPUT_SHAPE[1:], dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
