"""Calibration (passes/calibrate.py): consumers that read the same rows share one Gram, unless an in-place op may
change the tensor between their reads; in sequential calibration, the shadow's consumers read their kept channels
alone (``narrow_inputs``) and slots reading the same rows at different nodes share their statistics, and either
gives the model the plain scheme gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from grailc.passes import calibrate
from grailc.passes.calibrate import record_grams, shared_rows
from graph_checks import traced
from torch import nn

import grailc
from grailc import surgery


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


class ConvThenFlatten(nn.Module):
    """A 1x1 conv reads the stem's 8 channels; a linear reads its 4 channels flattened with 16 positions each."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4 * 16, 5)

    def forward(self, x):
        return self.head(self.mid(self.stem(x).relu()).flatten(1))


def zero_columns(gm, consumer, channels: list[int]) -> None:
    """Zero the weight columns of these input channels (every flattened position of each)."""
    w = surgery.get_param(gm, consumer.weight).detach().clone()
    inner = consumer.layout.inner
    view = w.view(w.shape[0], -1, inner, *w.shape[2:])
    view[:, channels] = 0
    surgery.set_param(gm, consumer.weight, w)


def test_a_consumer_narrowed_to_its_live_columns_computes_the_same():
    model = ConvThenFlatten().eval()
    gm, deps = traced(model, (2, 3, 4, 4))
    consumers = {c.module: c for c in deps.consumers}
    zero_columns(gm, consumers["mid"], [0, 2, 3, 5, 6])  # 3 of 8 channels live
    zero_columns(gm, consumers["head"], [1, 3])  # 2 of 4 channels live, 16 positions each
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        before = gm(x)

    for name, live in (("mid", 3), ("head", 2 * 16)):
        assert surgery.narrow_inputs(gm, consumers[name]) is not None
        node = next(n for n in gm.graph.nodes if n.name == consumers[name].node)
        assert node.args[0].target == torch.ops.aten.index_select.default
        assert surgery.get_param(gm, node.args[1].target).shape[1] == live
    gm.recompile()

    with torch.no_grad():
        torch.testing.assert_close(gm(x), before, rtol=1e-5, atol=1e-6)


def test_a_consumer_reading_nearly_all_its_columns_is_left_as_it_is():
    gm, deps = traced(ConvThenFlatten(), (2, 3, 4, 4))
    head = next(c for c in deps.consumers if c.module == "head")
    nodes = len(gm.graph.nodes)
    assert surgery.narrow_inputs(gm, head) is None  # all 64 columns live

    w = surgery.get_param(gm, head.weight).detach().clone()
    w[:, [5, 40]] = 0  # 62 of 64 columns live: gathering them would cost more than it saves
    surgery.set_param(gm, head.weight, w)
    assert surgery.narrow_inputs(gm, head) is None
    assert len(gm.graph.nodes) == nodes

    zero_columns(gm, head, [0])  # 46 of 64: narrowed
    assert surgery.narrow_inputs(gm, head) is not None
    assert len(gm.graph.nodes) == nodes + 3


@pytest.fixture
def counted(monkeypatch):
    """How many consumers ``narrow_inputs`` rewired, and how many slots ``record_consumer_inputs`` recorded."""
    count = {"narrowed": 0, "recorded": 0}
    narrow, record = calibrate.narrow_inputs, calibrate.record_consumer_inputs

    def narrowing(*args):
        found = narrow(*args)
        count["narrowed"] += found is not None
        return found

    def recording(runs, node, slots, *args):
        count["recorded"] += len(slots)
        return record(runs, node, slots, *args)

    monkeypatch.setattr(calibrate, "narrow_inputs", narrowing)
    monkeypatch.setattr(calibrate, "record_consumer_inputs", recording)
    return count


@pytest.mark.parametrize("turned_off", ["narrowing", "sharing"])
def test_the_narrowed_and_shared_shadow_gives_the_model_of_the_plain_one(counted, monkeypatch, turned_off):
    """In float64, so that the two differ by rounding alone (in float32 the convolutions' summation order moves
    the outputs by about 3e-4 relative)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().double()
    data = [torch.randn(8, 3, 32, 32, dtype=torch.float64) for _ in range(3)]

    def compress():
        return grailc.compress(model, calib=data, ratio=0.5, sequential=True, calib_held_out=1, onnx=False,
                               measure_latency=False, device="cpu")

    ours = compress()
    first = dict(counted)
    if turned_off == "narrowing":
        monkeypatch.setattr(surgery, "NARROW_BELOW", 0.0)
    else:
        monkeypatch.setattr(calibrate, "shared_rows", lambda gm, groups: {s.key: s.key for g in groups
                                                                           for s in g.consumers})
    plain = compress()

    assert first["narrowed"] >= 10  # the convolutions and the classifier read their kept channels alone
    again = {key: counted[key] - first[key] for key in counted}
    if turned_off == "narrowing":
        assert again["narrowed"] == 0
    else:  # each stage's first block and its shortcut read the same rows: 3 slots fewer recorded
        assert again["recorded"] == first["recorded"] + 3
    kept = [[g["kept"] for g in r.report["groups"]] for r in (ours, plain)]
    assert kept[0] == kept[1]
    with torch.no_grad():
        y, y_plain = ours.module(data[-1]), plain.module(data[-1])
    assert float((y - y_plain).norm() / y_plain.norm()) < 1e-9


class BiasedConvs(nn.Module):
    """3x3 convolutions with biases, one strided: consumers solved over their kernel taps."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.c(self.b(self.a(x).relu()).relu()).relu()
        return self.head(h.mean((2, 3)))


def test_taps_take_the_dense_output_from_the_dense_run(monkeypatch):
    """y, the target of a convolution solved over its taps, is the dense run's own output of that node (less its
    bias): the model is the one computing y again from the dense input gives."""
    from grailc.passes.taps import Kernel, _pair, dense_output

    def recomputed(dense, node, step):
        n = dense.order.named[node]
        w = surgery.get_param(dense.order.gm, n.args[1].target)
        args = list(n.args) + [None] * (7 - len(n.args))
        kernel = Kernel(tuple(w.shape[2:]), *(_pair(args[i], d) for i, d in ((3, 1), (4, 0), (5, 1))))
        return dense_output(dense.runner.env[n.args[0]], w, kernel, step)

    torch.manual_seed(0)
    model = BiasedConvs().eval().double()
    data = [torch.randn(8, 3, 16, 16, dtype=torch.float64) for _ in range(3)]

    def compress():
        return grailc.compress(model, calib=data, ratio=0.5, sequential=True, calib_held_out=1, onnx=False,
                               measure_latency=False, device="cpu", multiple_of=1)

    ours = compress()
    monkeypatch.setattr(calibrate, "_dense_conv_rows", recomputed)
    again = compress()

    assert ours.report["kernel_taps"] == again.report["kernel_taps"] and len(ours.report["kernel_taps"]) == 2
    with torch.no_grad():
        y, y_again = ours.module(data[-1]), again.module(data[-1])
    assert float((y - y_again).norm() / y_again.norm()) < 1e-9
