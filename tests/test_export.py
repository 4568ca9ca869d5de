"""The exported ONNX graph is clean: BatchNorm folded into the convs, nothing left over from the rewrite, constants
folded, a recent opset; and the optimised file still matches PyTorch."""

from __future__ import annotations

import collections

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import grailc
from grailc.export import ONNX_OPSET, graph_facts, onnx_parity, save_onnx
from grailc.models.fashion_resnet import FashionResNet
from grailc.models.fashion_vit import FashionViT
from grailc.surgery import get_param, set_param
from grailc.trace import capture, export

LEFTOVERS = {"BatchNormalization", "Identity", "Dropout", "Constant", "ConstantOfShape", "Gather", "Slice",
             "ScatterND", "Cast"}


def aten_counts(gm) -> collections.Counter:
    return collections.Counter(str(n.target).split(".")[1] for n in gm.graph.nodes if n.op == "call_function")


def resnet_with_statistics() -> torch.nn.Module:
    """A FashionResNet whose BatchNorms hold non-trivial statistics, so that folding them changes the weights."""
    torch.manual_seed(0)
    model = FashionResNet()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_resnet_export_folds_batchnorm_and_adds_nothing(tmp_path):
    model = resnet_with_statistics()
    calib = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = grailc.compress(model, calib=calib, ratio=0.5, calib_held_out=1, measure_latency=False)

    before = aten_counts(result.reference)  # the traced PyTorch graph
    assert before["batch_norm"] == before["conv2d"] == 20

    dense_path, comp_path = tmp_path / "dense.onnx", tmp_path / "model.onnx"
    save_onnx(export(result.reference, result.example), result.example, dense_path)
    parity = result.export_onnx(comp_path)  # the existing parity check, on the final (optimised) file
    dense, comp = graph_facts(dense_path), graph_facts(comp_path)

    assert dense["opset"] == comp["opset"] == ONNX_OPSET >= 21
    assert LEFTOVERS.isdisjoint(dense["nodes"]) and LEFTOVERS.isdisjoint(comp["nodes"]), comp["nodes"]
    assert dense["nodes"]["Conv"] == before["conv2d"]  # every BatchNorm went into its conv
    assert comp["nodes"] == dense["nodes"]  # compression changed widths, not the graph
    assert parity["nodes"] == comp["nodes"] and parity["relative_diff"] < 1e-5

    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(comp_path, x), result.module(x).numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(run_onnx(dense_path, x), model(x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("targets", [["heads"], ["mlp", "heads"]])
def test_vit_export_has_no_leftovers_from_the_rewrite(targets, tmp_path):
    torch.manual_seed(0)
    model = FashionViT(depth=2).eval()
    calib = [torch.randn(4, 1, 28, 28) for _ in range(3)]
    result = grailc.compress(model, calib=calib, ratio=0.5, targets=targets, calib_held_out=1,
                             measure_latency=False)
    gm, example = capture(model, [(1, 1, 28, 28)])
    dense_path, comp_path = tmp_path / "dense.onnx", tmp_path / "model.onnx"
    save_onnx(export(gm, example), example, dense_path)
    parity = result.export_onnx(comp_path)
    dense, comp = graph_facts(dense_path), graph_facts(comp_path)
    assert comp["nodes"] == dense["nodes"], (dense["nodes"], comp["nodes"])
    assert "Identity" not in comp["nodes"] and comp["opset"] == ONNX_OPSET
    assert parity["relative_diff"] < 1e-4
    assert onnx_parity(dense_path, gm, [example])["relative_diff"] < 1e-4


class OneByOne(torch.nn.Module):
    """A 3x3 conv, a 1x1 conv, global pooling and a classifier over the flattened channels."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.mix = torch.nn.Conv2d(8, 16, 1)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.mix(self.stem(x).relu()).relu(), 1), 1))


def test_a_weight_strided_like_channels_last_is_written_plain(tmp_path):
    """A product can leave a 1x1 kernel's [O, C, 1, 1] weight with strides (C, 1, C, C): contiguous, yet read as
    channels-last by the convolution, which would turn every tensor after it channels-last and make the ONNX export
    gather the classifier's input through Shape, Range and Gather. ``set_param`` writes plain strides."""
    torch.manual_seed(0)
    model = OneByOne().eval()
    example = (torch.randn(2, 3, 8, 8),)
    gm, _ = capture(model, [(2, 3, 8, 8)])
    w = model.mix.weight.detach()
    odd = torch.empty_strided(w.shape, (8, 1, 8, 8)).copy_(w)
    assert odd.is_contiguous() and odd.stride() == (8, 1, 8, 8)

    set_param(gm, "mix.weight", odd)

    assert get_param(gm, "mix.weight").stride() == (8, 1, 1, 1)
    path = tmp_path / "m.onnx"
    save_onnx(export(gm, example), example, path)
    nodes = graph_facts(path)["nodes"]
    assert {"Shape", "Range", "Gather"}.isdisjoint(nodes), nodes
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(path, example[0]), model(*example).numpy(), rtol=1e-5, atol=1e-5)
