"""Requirement 5: a result that fails its checks is not written; only report.json says why (exit 3)."""

from __future__ import annotations

import json

import grailc.passes.verify as verify
import pytest

import grailc.api

from .helpers import FAST, leftovers, run_cli, save_pt2, tiny


@pytest.fixture(scope="module")
def model_pt2(tmp_path_factory):
    return save_pt2(tiny(), tmp_path_factory.mktemp("model") / "tiny.pt2")


def assert_only_a_failure_report(out, lines, *needles) -> dict:
    assert len(lines) == 1 and lines[0].startswith("grailc: verification failed:"), lines
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    report = json.loads((out / "report.json").read_text())
    for needle in needles:
        assert needle in report["failure"], report["failure"]
    assert not leftovers(out.parent)
    return report


def test_keep_all_mismatch(model_pt2, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(verify, "permutation_error", lambda *args: 1.0)
    out = tmp_path / "out"
    code, lines = run_cli([model_pt2, *FAST, "--out", out], capfd)
    assert code == 3
    report = assert_only_a_failure_report(out, lines, "keeping every channel in a random order does not reproduce")
    assert report["verification"]["permutation_error"] == 1.0
    assert report["groups"] and report["model"]["sha256"]


def test_output_error_nan(model_pt2, tmp_path, capfd, monkeypatch):
    real = verify.output_error

    def nan_error(*args):
        return {**real(*args), "relative_l2": float("nan")}

    monkeypatch.setattr(verify, "permutation_error", lambda *args: 0.0)  # it measures with output_error too
    monkeypatch.setattr(verify, "output_error", nan_error)
    out = tmp_path / "out"
    code, lines = run_cli([model_pt2, *FAST, "--out", out], capfd)
    assert code == 3
    assert_only_a_failure_report(out, lines, "not finite")


def test_onnx_parity_off(model_pt2, tmp_path, capfd, monkeypatch):
    def fake_export(program, example, path):  # stands in for the (slow) real export: a file must be removed
        path.write_bytes(b"onnx")

    def far_off(path, module, batches):
        return {"max_abs_diff": 5.0, "relative_diff": 0.5, "provider": "CPUExecutionProvider", "latency_ms": 1.0,
                "latency_batch": 1}

    monkeypatch.setattr(grailc.api, "save_onnx", fake_export)
    monkeypatch.setattr(grailc.api, "onnx_parity", far_off)
    out = tmp_path / "out"
    flags = [f for f in FAST if f != "--no-onnx"]
    code, lines = run_cli([model_pt2, *flags, "--out", out], capfd)
    assert code == 3
    report = assert_only_a_failure_report(out, lines, "ONNX Runtime output differs", "0.5 relative")
    assert report["onnx"]["relative_diff"] == 0.5


def test_onnx_runtime_rejecting_the_model(model_pt2, tmp_path, capfd, monkeypatch):
    def fake_export(program, example, path):
        path.write_bytes(b"not an onnx model")

    monkeypatch.setattr(grailc.api, "save_onnx", fake_export)
    out = tmp_path / "out"
    flags = [f for f in FAST if f != "--no-onnx"]
    code, lines = run_cli([model_pt2, *flags, "--out", out], capfd)
    assert code == 3
    assert_only_a_failure_report(out, lines, "ONNX Runtime cannot run the exported model")
