"""Requirement 4: outputs appear all at once or not at all; an existing output and the input are never harmed."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

import pytest

import grailc.api
from grailc.passmanager import PASSES, _load_passes

from .helpers import FAST, SHAPE_FLAG, assert_one_error_line, leftovers, run_cli, save_pt2, sha256, tiny


def old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    return out


def test_existing_output_needs_force(model_pt2, tmp_path, capfd):
    out = old_output(tmp_path)
    digest = sha256(model_pt2)

    code, lines = run_cli([model_pt2, *FAST, "--out", out], capfd)

    assert code == 2
    assert_one_error_line(lines, "already exists", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "an earlier result"

    code, lines = run_cli([model_pt2, *FAST, "--out", out, "--force"], capfd)

    assert code == 0, lines
    assert sorted(p.name for p in out.iterdir()) == ["model.pt2", "report.json"]
    assert not leftovers(tmp_path)
    assert sha256(model_pt2) == digest


def test_outputs_are_staged_then_renamed_into_place(model_pt2, tmp_path, capfd, monkeypatch):
    out = tmp_path / "out"
    seen = {}
    real_save = grailc.api.save_pt2

    def spy(program, path):
        seen["folder"], seen["out_exists"] = path.parent, out.exists()
        real_save(program, path)

    monkeypatch.setattr(grailc.api, "save_pt2", spy)
    code, _ = run_cli([model_pt2, *FAST, "--out", out], capfd)

    assert code == 0
    assert seen["folder"].parent == tmp_path and ".grailc-staging-" in seen["folder"].name
    assert not seen["out_exists"], "the output folder must appear only once it is complete"
    assert (out / "model.pt2").exists() and not seen["folder"].exists() and not leftovers(tmp_path)


def test_model_inside_the_output_folder_is_not_replaced(tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    model = save_pt2(tiny(), out / "model.pt2")
    digest = sha256(model)

    code, lines = run_cli([model, *FAST, "--out", out, "--force"], capfd)

    assert code == 2
    assert_one_error_line(lines, "inside the output folder")
    assert sha256(model) == digest and sorted(p.name for p in out.iterdir()) == ["model.pt2"]


@pytest.fixture
def failing_pass(monkeypatch):
    _load_passes()

    def boom(ctx):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(PASSES["compensate"], "run", boom)


def test_exception_half_way_leaves_nothing(model_pt2, tmp_path, capfd, failing_pass):
    code, lines = run_cli([model_pt2, *FAST, "--out", tmp_path / "out"], capfd)

    assert code == 4
    assert_one_error_line(lines, "pass 'compensate' failed", "injected failure", "--debug")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_exception_half_way_keeps_the_old_output_even_with_force(model_pt2, tmp_path, capfd, failing_pass):
    out = old_output(tmp_path)
    code, _ = run_cli([model_pt2, *FAST, "--out", out, "--force"], capfd)
    assert code == 4
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and not leftovers(tmp_path)


def test_write_failure_leaves_nothing(model_pt2, tmp_path, capfd, monkeypatch):
    """The disk fills up while model.pt2 is written: a clear error, no half-written output."""

    def disk_full(program, path):
        path.write_bytes(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(grailc.api, "save_pt2", disk_full)
    code, lines = run_cli([model_pt2, *FAST, "--out", tmp_path / "out"], capfd)

    assert code == 2
    assert_one_error_line(lines, "cannot write model.pt2", "No space left on device")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def read_until(stream, needle: bytes, timeout: float) -> bytes:
    """Read ``stream`` until ``needle`` shows up, EOF, or ``timeout`` seconds."""
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while needle not in seen and time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                chunk = os.read(stream.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
    return seen


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_calibration_leaves_nothing(tmp_path, signum):
    model = save_pt2(tiny(width=32), tmp_path / "wide.pt2")
    digest = sha256(model)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "grailc.cli", "compress", str(model), "--calib", "random",
            "--input-shape", SHAPE_FLAG, "--calib-batches", "600", "--batch-size", "8", "--held-out", "1",
            "--one-shot", "--no-onnx", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        seen = read_until(proc.stderr, b"calibrate", timeout=120)
        assert b"calibrate" in seen, f"calibration never started: {seen[-2000:]!r}"
        time.sleep(0.3)
        assert proc.poll() is None, "the compile finished before it could be interrupted: make it longer"
        proc.send_signal(signum)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = (seen + rest).decode(errors="replace")

    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; nothing was written" in err and "Traceback" not in err
    assert not out.exists() and not leftovers(tmp_path)
    assert sha256(model) == digest


@pytest.mark.parametrize("out", [".", ".."])
def test_force_never_replaces_the_current_folder(model_pt2, tmp_path, capfd, monkeypatch, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep me")
    monkeypatch.chdir(work)

    code, lines = run_cli([model_pt2, *FAST, "--out", out, "--force"], capfd)

    assert code == 2
    assert_one_error_line(lines, "current folder")
    assert (work / "precious.txt").read_text() == "keep me" and not leftovers(work) and not leftovers(tmp_path)


def test_out_of_memory_is_one_line(model_pt2, tmp_path, capfd, monkeypatch):
    """An allocation that fails (a huge --input-shape) is a clear error, not a crash (simulated: a real one could
    wake the OOM killer on a machine that overcommits)."""
    import grailc.calib_data

    def huge(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 480000000000 bytes")

    monkeypatch.setattr(grailc.calib_data, "load_calibration", huge)
    code, lines = run_cli([model_pt2, *FAST, "--out", tmp_path / "out"], capfd)
    assert code == 2
    assert_one_error_line(lines, "out of memory", "480000000000 bytes", "--batch-size")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
