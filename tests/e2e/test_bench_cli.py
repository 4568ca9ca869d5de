"""``grailc compress --bench`` and ``grailc bench OUT/`` as a user runs them: files, printed table, report.json."""

from __future__ import annotations

import json
import math

import pytest
import torch

from grailc.cli import main
from grailc.models.fashion_resnet import FashionResNet

FAST = ["--calib", "random", "--calib-batches", "3", "--batch-size", "4", "--held-out", "1", "--ratio", "0.5",
        "--quiet"]


@pytest.fixture(scope="module")
def resnet_pt2(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "resnet.pt2"
    torch.export.save(torch.export.export(FashionResNet().eval(), (torch.randn(2, 1, 28, 28),)), str(path))
    return path


def check_bench(report: dict, batches: list[int]) -> None:
    bench = report["bench"]
    assert bench["ideal_speedup"] == pytest.approx(report["macs_before"] / report["macs_after"])
    assert bench["dense"] == "dense.onnx" and bench["compressed"] == "model.onnx"
    assert [r["batch"] for r in bench["runs"]] == batches
    for r in bench["runs"]:
        assert r["provider"] == "CPUExecutionProvider" and r["precision"] == "fp32"
        for value in (r["dense_ms"]["median"], r["compressed_ms"]["median"], r["speedup"],
                      r["realised_fraction_of_ideal"], r["compressed_samples_per_s"]):
            assert math.isfinite(value) and value > 0


def test_compress_with_bench_writes_dense_onnx_and_the_figures(resnet_pt2, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compress", str(resnet_pt2), *FAST[:-1], "--bench", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert sorted(p.name for p in out.iterdir()) == ["dense.onnx", "model.onnx", "model.pt2", "report.json"]
    report = json.loads((out / "report.json").read_text())
    check_bench(report, [1, 32])
    assert report["bench"]["dense_onnx"]["relative_diff"] < 1e-4
    assert "BatchNormalization" not in report["bench"]["dense_onnx"]["nodes"]
    assert "ideal speed-up (MACs before / after)" in printed.out and "speed-up" in printed.out

    code = main(["bench", str(out), "--batch", "1", "3", "--repeats", "3", "--warmup", "1"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    check_bench(json.loads((out / "report.json").read_text()), [1, 3])
    assert "CPU" in printed.out and "wrote the figures" in printed.out
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_bench_measuring_flags_are_used_or_refused(resnet_pt2, tmp_path, capsys):
    """--threads, --max-seconds and --provider through the CLI: used as given, or refused (exit 2, one line, the
    report untouched) where they cannot be: a negative count, no time at all, or a GPU provider that ONNX Runtime
    lists but cannot run here (onnxruntime-gpu without a GPU)."""
    from grailc.bench import CUDA, runs_on

    out = tmp_path / "out"
    assert main(["compress", str(resnet_pt2), *FAST[:-1], "--bench", "--out", str(out)]) == 0
    capsys.readouterr()
    code = main(["bench", str(out), "--threads", "1", "--provider", "cpu", "--max-seconds", "0.5", "--batch", "2",
                 "--repeats", "3", "--warmup", "1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    check_bench(report, [2])
    assert report["bench"]["threads"] == 1
    before = (out / "report.json").read_bytes()
    for flags, message in ((["--threads", "-1"], "--threads must be zero"),
                           (["--max-seconds", "0"], "--max-seconds must be positive")):
        assert main(["bench", str(out), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    if runs_on(CUDA):  # a machine with a GPU: the CUDA provider measures
        assert main(["bench", str(out), "--provider", "cuda", "--batch", "2", "--repeats", "3", "--quiet"]) == 0
        assert {r["provider"] for r in json.loads((out / "report.json").read_text())["bench"]["runs"]} == {CUDA}
    else:
        assert main(["bench", str(out), "--provider", "cuda", "--repeats", "2"]) == 2
        printed = capsys.readouterr()
        err = printed.err.strip().splitlines()
        assert len(err) == 1 and "--provider cuda" in err[0] and "--provider cpu" in err[0], printed.err
        assert "measuring" not in printed.out
        assert (out / "report.json").read_bytes() == before


def test_bench_exports_the_dense_model_when_asked(resnet_pt2, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(resnet_pt2), *FAST, "--out", str(out)]) == 0, capsys.readouterr().err
    assert not (out / "dense.onnx").exists()

    assert main(["bench", str(out), "--repeats", "2"]) == 2
    err = capsys.readouterr().err
    assert "no dense.onnx" in err and "--dense MODEL" in err

    other = tmp_path / "other.pt2"
    torch.export.save(torch.export.export(FashionResNet(widths=(8, 16, 32, 64)).eval(),
                                          (torch.randn(2, 1, 28, 28),)), str(other))
    assert main(["bench", str(out), "--dense", str(other), "--repeats", "2"]) == 2
    assert "not the model that was compressed" in capsys.readouterr().err
    rgb = tmp_path / "rgb.pt2"  # another input shape: refused as another model, not with advice bench cannot take
    torch.export.save(torch.export.export(torch.nn.Conv2d(3, 4, 3).eval(), (torch.randn(2, 3, 8, 8),)), str(rgb))
    assert main(["bench", str(out), "--dense", str(rgb), "--repeats", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not the model that was compressed" in err[0] and "--input-shape" not in err[0]

    code = main(["bench", str(out), "--dense", str(resnet_pt2), "--batch", "2", "--repeats", "3", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (out / "dense.onnx").is_file()
    check_bench(json.loads((out / "report.json").read_text()), [2])


def test_bench_without_onnx_is_refused_before_compiling(resnet_pt2, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(resnet_pt2), *FAST, "--bench", "--no-onnx", "--out", str(out)]) == 2
    assert "--bench measures the ONNX models" in capsys.readouterr().err
    assert not out.exists()
