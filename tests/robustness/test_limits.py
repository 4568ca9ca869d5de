"""Requirement 6: a memory budget too small for the Grams is refused before calibration, naming the size."""

from __future__ import annotations

import grailc.passes.calibrate as calibrate
import pytest
import torch
from torch import nn

from .helpers import FAST, INPUT_SHAPE, assert_one_error_line, run_cli, save_pt2, tiny


# two 16-channel groups of 16 * 16 * 8 B = 2 KiB each: one-shot holds both Grams (4 KiB), sequential the five
# Grams of one consumer (Gz, C, and the error sample's Gz, C, Gx: 10 KiB) and, the consumer being a 3x3
# convolution solved over its taps (the default), five more over its 144 (channel, tap) pairs and 16 outputs
# (362 KiB)
@pytest.mark.parametrize(("mode", "budget", "needs", "hint"), [
    ("--one-shot", "1KiB", "4.00 KiB", "exclude"),
    ("--sequential", "1KiB", "372.00 KiB", "exclude"),
    ("--sequential", "100KiB", "372.00 KiB", "use --kernel-solve channels (needs 10.00 KiB here)"),
    ("--one-shot", "3KiB", "4.00 KiB", "exclude")])
def test_max_memory_refuses_before_calibration(tmp_path, capfd, monkeypatch, mode, budget, needs, hint):
    def must_not_run(*args, **kwargs):
        raise AssertionError("calibration started despite the memory budget")

    monkeypatch.setattr(calibrate, "record_grams", must_not_run)
    monkeypatch.setattr(calibrate, "record_consumer_inputs", must_not_run)
    path = save_pt2(tiny(width=16), tmp_path / "m.pt2")

    code, lines = run_cli([path, *FAST, mode, "--max-memory", budget, "--out", tmp_path / "out"], capfd)

    assert code == 2
    line = assert_one_error_line(lines, f"needs {needs}", budget.replace("KiB", ".00 KiB"), "--max-memory", hint)
    assert "drop --one-shot" not in line  # sequential needs more here: never advise what would not fit
    assert not (tmp_path / "out").exists()


def test_one_shot_over_budget_names_sequential_where_it_fits(tmp_path, capfd):
    """Seven 16-channel groups: one-shot holds seven Grams (14 KiB), sequential five of one consumer (10 KiB), and
    five more over its (channel, tap) pairs and outputs with the default --kernel-solve (372 KiB in all): the
    advice says how sequential calibration fits."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(INPUT_SHAPE[1], 16, 3, padding=1), nn.ReLU()]
    for _ in range(7):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
    path = save_pt2(nn.Sequential(*layers).eval(), tmp_path / "m.pt2")

    code, lines = run_cli([path, *FAST, "--one-shot", "--max-memory", "12KiB", "--out", tmp_path / "out"], capfd)

    assert code == 2
    assert_one_error_line(lines, "needs 14.00 KiB", "drop --one-shot and use --kernel-solve channels (sequential "
                          "calibration then needs 10.00 KiB here)")
    assert not (tmp_path / "out").exists()
