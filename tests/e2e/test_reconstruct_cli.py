"""``grailc compress --reconstruct`` as a user runs it: a .pt2 model, calibration from a tensor file, the report."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from grailc.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_cli_reconstruct_block_writes_a_verified_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = Net().eval()
    model_path, calib = tmp_path / "net.pt2", tmp_path / "calib.pt"
    torch.export.save(torch.export.export(model, (torch.randn(2, 1, 10, 10),)), str(model_path))
    torch.save(torch.randn(40, 1, 10, 10), calib)
    out = tmp_path / "out"
    code = main(["compress", str(model_path), "--calib", str(calib), "--calib-batches", "5", "--batch-size", "8",
                 "--held-out", "1", "--ratio", "0.5", "--selector", "magnitude", "--reconstruct", "block",
                 "--reconstruct-steps", "20", "--reconstruct-lr", "3e-3", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    rc = report["reconstruct"]
    assert rc["kind"] == "block" and rc["steps"] == 20 and rc["lr"] == 3e-3 and rc["backprop"] is True
    assert report["recipe"]["pipeline"][-3:] == ["apply", "reconstruct", "verify"]
    trained = [w for w in rc["windows"] if "skipped" not in w]
    assert trained and all(w["loss_after"] <= w["loss_before"] for w in trained)
    assert "reconstruct" in report["timings"]
    assert report["verification"]["permutation_error"] <= 1e-5
    assert report["onnx"]["max_abs_diff"] < 1e-3
    reloaded = torch.export.load(str(out / "model.pt2")).module()
    assert reloaded(torch.randn(3, 1, 10, 10)).shape == (3, 4)


@pytest.mark.parametrize("flags, expect", [
    (["--reconstruct", "group"], {"kind": "group"}),
    (["--reconstruct", "layer"], {"kind": "layer"}),
    (["--reconstruct", "block", "--reconstruct-fed", "dense"], {"fed": "dense"}),
    (["--reconstruct", "block", "--reconstruct-params", "lowrank", "--reconstruct-rank", "2"],
     {"params": "lowrank", "rank": 2}),
    (["--reconstruct", "block", "--reconstruct-params", "norms+biases"], {"params": "norms+biases"}),
    (["--reconstruct", "block", "--reconstruct-batch", "4"], {"batch_size": 4}),
    (["--reconstruct", "block", "--reconstruct-optimizer", "rmsprop"], {"optimizer": "RMSprop"}),
])
def test_cli_reconstruct_variants_train_what_their_flags_say(tmp_path, capsys, flags, expect):
    """Each documented --reconstruct-* flag through the CLI: the report says it was used, a window's error drops,
    and the written model still passes the checks."""
    torch.manual_seed(0)
    model_path, calib = tmp_path / "net.pt2", tmp_path / "calib.pt"
    torch.export.save(torch.export.export(Net().eval(), (torch.randn(2, 1, 10, 10),)), str(model_path))
    torch.save(torch.randn(40, 1, 10, 10), calib)
    out = tmp_path / "out"
    code = main(["compress", str(model_path), "--calib", str(calib), "--calib-batches", "5", "--batch-size", "8",
                 "--held-out", "1", "--ratio", "0.5", "--selector", "magnitude", "--compensate", "grail",
                 "--reconstruct-steps", "40", "--reconstruct-lr", "1e-3", *flags, "--no-onnx",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    rc = report["reconstruct"]
    assert {k: rc.get(k) for k in expect} == expect
    trained = [w for w in rc["windows"] if "skipped" not in w]
    assert trained and any(w["loss_after"] < w["loss_before"] for w in trained)
    if rc["params"] == "norms+biases":
        assert all(w["trained"] < w["params"] for w in trained)
    assert report["verification"]["permutation_error"] <= 1e-5
    assert torch.export.load(str(out / "model.pt2")).module()(torch.randn(3, 1, 10, 10)).shape == (3, 4)


def test_cli_rejects_an_unknown_reconstruct_kind(tmp_path, capsys):
    torch.manual_seed(0)
    model_path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(Net().eval(), (torch.randn(2, 1, 10, 10),)), str(model_path))
    code = main(["compress", str(model_path), "--calib", "random", "--reconstruct", "blocks",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "reconstruct kind 'blocks'" in err[0] and "block" in err[0]
    assert not (tmp_path / "o").exists()
