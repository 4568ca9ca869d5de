"""Requirement 6: a memory budget too small for the Grams is refused before calibration, naming the size."""

from __future__ import annotations

import grailc.passes.calibrate as calibrate
import pytest

from .helpers import FAST, assert_one_error_line, run_cli, save_pt2, tiny


# two 16-channel groups of 16 * 16 * 8 B = 2 KiB each: one-shot holds both Grams (4 KiB), sequential the three
# Grams of one consumer (Gz, C, Gx: 6 KiB)
@pytest.mark.parametrize(("mode", "needs", "hint"), [("--one-shot", "4.00 KiB", "holds fewer Grams"),
                                                     ("--sequential", "6.00 KiB", "exclude")])
def test_max_memory_refuses_before_calibration(tmp_path, capfd, monkeypatch, mode, needs, hint):
    def must_not_run(*args, **kwargs):
        raise AssertionError("calibration started despite the memory budget")

    monkeypatch.setattr(calibrate, "record_grams", must_not_run)
    monkeypatch.setattr(calibrate, "record_consumer_inputs", must_not_run)
    path = save_pt2(tiny(width=16), tmp_path / "m.pt2")

    code, lines = run_cli([path, *FAST, mode, "--max-memory", "1KiB", "--out", tmp_path / "out"], capfd)

    assert code == 2
    line = assert_one_error_line(lines, f"needs {needs}", "1.00 KiB", "--max-memory", hint)
    assert ("drop --one-shot" in line) == (mode == "--one-shot")  # never the advice to do what was done
    assert not (tmp_path / "out").exists()
