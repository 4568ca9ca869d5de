"""Requirement 6: a memory budget too small for the Grams is refused before calibration, naming the size."""

from __future__ import annotations

import grailc.passes.calibrate as calibrate

from .helpers import FAST, assert_one_error_line, run_cli, save_pt2, tiny


def test_max_memory_refuses_before_calibration(tmp_path, capfd, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("calibration started despite the memory budget")

    monkeypatch.setattr(calibrate, "record_grams", must_not_run)
    path = save_pt2(tiny(width=16), tmp_path / "m.pt2")  # two 16-channel groups: 2 * 16 * 16 * 8 B = 4 KiB

    code, lines = run_cli([path, *FAST, "--max-memory", "1KiB", "--out", tmp_path / "out"], capfd)

    assert code == 2
    assert_one_error_line(lines, "needs 4.00 KiB", "4096 bytes", "1.00 KiB", "--max-memory")
    assert not (tmp_path / "out").exists()
