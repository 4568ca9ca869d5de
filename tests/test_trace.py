"""Tracing corner cases: models fixed to one batch size, literal sizes in views that follow pruning, and models
with several inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from two_inputs import ConvWithScale, TokensWithMask, ids_and_mask, image_and_scale

import grailc
from grailc.errors import CalibrationError, RecipeError
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
    gm, example = capture(FixedBatch().eval(), [(1, 3, 8, 8)])
    assert static_batch(gm) == 1 and example[0].shape[0] == 1
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


def check_two_inputs(result, out, batch: tuple) -> None:
    """Checks passed, fewer parameters, ONNX and .pt2 take both inputs at any batch size."""
    import onnxruntime as ort

    assert result.report["verification"]["permutation_error"] <= 1e-5
    assert result.report["params_after"] < result.report["params_before"]
    assert len(result.example) == 2
    result.save(out)
    assert result.report["onnx"]["relative_diff"] < 1e-3
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert len(session.get_inputs()) == 2 and all(isinstance(i.shape[0], str) for i in session.get_inputs())
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), batch)})[0]
    want = torch.export.load(str(out / "model.pt2")).module()(*batch)
    torch.testing.assert_close(torch.from_numpy(got), want.detach(), atol=1e-4, rtol=1e-3)


def test_a_model_with_an_image_and_a_scale_input(tmp_path):
    result = grailc.compress(ConvWithScale().eval(), calib=image_and_scale(), ratio=0.5, calib_held_out=1)
    assert result.report["recipe"]["input_shape"] == [[1, 3, 8, 8], [1, 1]]
    assert [t.dtype for t in result.example] == [torch.float32, torch.float32]
    check_two_inputs(result, tmp_path / "out", image_and_scale(batch=3, count=1)[0])


def test_a_token_model_with_ids_and_attention_mask(tmp_path):
    calib = [{"attention_mask": mask, "ids": ids} for ids, mask in ids_and_mask()]  # a dict is matched by name
    result = grailc.compress(TokensWithMask().eval(), calib=calib, ratio=0.5, calib_held_out=1)
    assert [t.dtype for t in result.example] == [torch.int64, torch.int64]  # integer inputs are not cast
    check_two_inputs(result, tmp_path / "out", ids_and_mask(batch=3, count=1)[0])


def test_sequential_calibration_and_a_fixed_input_shape_take_both_inputs():
    result = grailc.compress(ConvWithScale().eval(), input_shape=[(1, 3, 8, 8), (1, 1)], calib=image_and_scale(),
                             ratio=0.5, calib_held_out=1, sequential=True)
    assert result.report["verification"]["permutation_error"] <= 1e-5
    assert result.report["params_after"] < result.report["params_before"]


def test_a_one_input_model_still_takes_input_label_pairs():
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 3, 4, 4, generator=g), torch.arange(4)) for _ in range(3)]
    result = grailc.compress(LiteralView().eval(), calib=calib, ratio=0.5, calib_held_out=1)
    assert len(result.example) == 1 and result.report["recipe"]["input_shape"] == [1, 3, 4, 4]


def test_inputs_that_do_not_fit_a_two_input_model_are_named():
    model = ConvWithScale().eval()
    x, scale = image_and_scale(count=1)[0]
    with pytest.raises(CalibrationError, match=r"holds 1 tensor\(s\) but the model takes 2 input\(s\) \(x, scale\)"):
        grailc.compress(model, calib=[x])
    with pytest.raises(CalibrationError, match=r"different batch sizes \(x 4, scale 3\)"):
        grailc.compress(model, calib=[(x, scale[:3])])
    with pytest.raises(CalibrationError, match=r"keys \(x, mask\) but the model's inputs are \(x, scale\)"):
        grailc.compress(model, calib=[{"x": x, "mask": scale}])
    with pytest.raises(CalibrationError, match=r"input scale has shape \[4, 1\] but the input shape is \[1, 2\]"):
        grailc.compress(model, input_shape=[[1, 3, 8, 8], [1, 2]], calib=[(x, scale)])
    with pytest.raises(RecipeError, match=r"1 input shape\(s\) given, but the model takes 2 input\(s\) \(x, scale\)"):
        grailc.compress(model, input_shape=[1, 3, 8, 8], calib=[(x, scale)])
