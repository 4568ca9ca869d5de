"""Requirement 1: untrusted files never run code unless --trust-pickle is given."""

from __future__ import annotations

import pytest
import torch

from grailc.errors import GrailcError, UntrustedFileError
from grailc.loading import load_model

from .helpers import FAST, WritesMarkerWhenUnpickled, pt2_with_evil_sample_inputs, run_cli, save_pt2, sha256, tiny


def test_crafted_pickle_does_not_run_through_the_cli(tmp_path, capfd):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(WritesMarkerWhenUnpickled(marker), evil)
    digest = sha256(evil)

    code, lines = run_cli([evil, *FAST, "--out", tmp_path / "out"], capfd)

    assert code == 2
    assert not marker.exists()
    assert len(lines) == 1 and lines[0].startswith("grailc: error:"), lines
    line = lines[0]
    assert "--trust-pickle" in line and "runs any code" in line, "the error must say what the flag does"
    assert ".pt2" in line and "--weights" in line, "the error must suggest the safe formats"
    assert not (tmp_path / "out").exists() and sha256(evil) == digest

    torch.load(evil, weights_only=False)
    assert marker.exists(), "the payload must really run when unpickled, otherwise the test proves nothing"


def test_crafted_pt2_does_not_run_code_on_load(tmp_path, capfd):
    """torch.export.load unpickles sample inputs with weights_only=False as a fallback: grailc must not let it."""
    marker = tmp_path / "pwned"
    good = save_pt2(tiny(), tmp_path / "good.pt2")
    evil = pt2_with_evil_sample_inputs(good, tmp_path / "evil.pt2", marker)

    code, lines = run_cli([evil, *FAST, "--out", tmp_path / "out"], capfd)

    assert code == 2 and not marker.exists()
    assert len(lines) == 1 and "--trust-pickle" in lines[0] and "arbitrary code" in lines[0], lines
    with pytest.raises(UntrustedFileError):
        load_model(str(evil))
    assert not marker.exists()
    assert torch.load is torch.serialization.load, "the load guard must restore torch.load"

    with pytest.raises(GrailcError):  # the payload runs, then torch finds no sample inputs in what it returned
        load_model(str(evil), trust_pickle=True)
    assert marker.exists(), "with --trust-pickle the archive loads as torch would load it (payload included)"


def test_full_module_pickle_needs_the_flag(tmp_path, capfd):
    path = tmp_path / "model.pt"
    torch.save(tiny(), path)

    code, lines = run_cli([path, *FAST, "--out", tmp_path / "refused"], capfd)
    assert code == 2 and "--trust-pickle" in lines[0] and len(lines) == 1

    code, _ = run_cli([path, "--trust-pickle", *FAST, "--out", tmp_path / "ok"], capfd)
    assert code == 0 and (tmp_path / "ok" / "model.pt2").exists()
