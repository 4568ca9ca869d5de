"""Requirement 2: every bad input is one clear line and a non-zero exit; the traceback only with --debug."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from grailc.errors import GrailcError

from .helpers import (
    FAST,
    CumsumBetweenConvs,
    DataDependentBranch,
    FlipBetweenConvs,
    assert_one_error_line,
    fast_with,
    leftovers,
    run_cli,
    save_pt2,
    sha256,
    tiny,
)


def _bad_image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"this is not a png")
    return ["--calib", folder], ["broken.png", "image"]


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return ["--calib", tmp_path / "empty"], ["no image files", "empty"]


def _wrong_tensor_shape(tmp_path):
    np.save(tmp_path / "inputs.npy", np.zeros((4, 3, 16, 16), np.float32))
    return ["--calib", tmp_path / "inputs.npy"], ["inputs.npy", "[4, 3, 16, 16]", "[N, 3, 32, 32]"]


def _unknown_recipe_key(tmp_path):
    (tmp_path / "recipe.toml").write_text('ratoi = 0.3\nselector = "wanda"\n')
    return ["--recipe", tmp_path / "recipe.toml"], ["'ratoi'", "did you mean 'ratio'"]


def _recipe(text: str, *needles: str):
    def make(tmp_path):
        (tmp_path / "recipe.toml").write_text(text)
        return ["--recipe", tmp_path / "recipe.toml"], list(needles)

    return make


# name -> (tmp_path -> (extra flags, needles in the error line)); they override FAST's (see fast_with)
CASES = {
    "input shape unparseable": lambda t: (["--input-shape", "1,three,32,32"], ["input shape", "1,3,224,224"]),
    "input shape does not fit": lambda t: (["--input-shape", "1,1,32,32"], ["[1, 1, 32, 32]", "[N, 3, 32, 32]"]),
    "unreadable calibration image": _bad_image_folder,
    "empty calibration folder": _empty_folder,
    "tensor file of the wrong shape": _wrong_tensor_shape,
    "ratio 1.0": lambda t: (["--ratio", "1.0"], ["ratio 1.0", "[0, 1)"]),
    "ratio -0.1": lambda t: (["--ratio", "-0.1"], ["ratio -0.1", "[0, 1)"]),
    "ratio nan": lambda t: (["--ratio", "nan"], ["ratio nan"]),
    "lam nan": lambda t: (["--lam", "nan"], ["lam nan"]),
    "unknown selector": lambda t: (["--selector", "wandda"], ["unknown selector", "did you mean 'wanda'"]),
    "unknown compensator": lambda t: (["--compensate", "grial"], ["unknown compensator", "did you mean 'grail'"]),
    "unknown recipe key": _unknown_recipe_key,
    "recipe value of the wrong type": _recipe('lam = "big"\n', "field lam", "number", "lam = 0.001"),
    "recipe that is not TOML": _recipe("ratio = = 1\n", "not valid TOML"),
    "pipeline without verify": _recipe('pipeline = ["analyse", "calibrate", "select", "apply"]\n', "'verify'"),
    "pipeline out of order": _recipe('pipeline = ["select", "verify"]\n', "'select' needs 'calibrate'"),
    "std zero": lambda t: (["--std", "0"], ["calib.std [0.0] must be positive"]),
    "LLM structure for a CNN": lambda t: (["--structure", "global"], ["--structure is for hf:", "--budget"]),
    "LLM windows for a CNN": lambda t: (["--seq-len", "64"], ["--seq-len is for hf:", "--calib-batches"]),
    "LLM streaming for a CNN": lambda t: (["--stream"], ["--stream is for hf:"]),
    "memory size unreadable": lambda t: (["--max-memory", "lots"], ["memory size", "8GiB"]),
    "multiple of 0": lambda t: (["--multiple-of", "0"], ["multiple_of 0", "auto", "1 keeps exact widths"]),
    "recipe multiple_of not auto": _recipe('multiple_of = "eight"\n', "multiple_of 'eight'", "auto"),
    "kernel taps with one-shot": lambda t: (["--kernel-solve", "taps", "--one-shot"],
                                            ["kernel_solve taps needs sequential", "--kernel-solve channels"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line(case, model_pt2, tmp_path, capfd):
    extra, needles = CASES[case](tmp_path)
    digest = sha256(model_pt2)
    out = tmp_path / "out"

    code, lines = run_cli([model_pt2, *fast_with(extra), "--out", out], capfd)

    assert code == 2
    assert_one_error_line(lines, *needles)
    assert not out.exists() and not leftovers(tmp_path)
    assert sha256(model_pt2) == digest


def test_missing_model_file(tmp_path, capfd):
    code, lines = run_cli([tmp_path / "nope.pt2", *FAST, "--out", tmp_path / "out"], capfd)
    assert code == 2
    assert_one_error_line(lines, "not found", "nope.pt2")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"garbage" * 50, b"PK\x03\x04truncated zip"])
def test_corrupt_model_file(tmp_path, capfd, content):
    path = tmp_path / "corrupt.pt2"
    path.write_bytes(content)
    code, lines = run_cli([path, *FAST, "--out", tmp_path / "out"], capfd)
    assert code == 2
    assert_one_error_line(lines, "corrupt", "corrupt.pt2")
    assert path.read_bytes() == content


def test_input_shape_that_does_not_fit_a_module(tmp_path, capfd):
    """A pickled module (no recorded input shape) run on 1 channel: the error says it is the input, not tracing."""
    path = tmp_path / "model.pt"
    torch.save(tiny(), path)
    code, lines = run_cli([path, "--trust-pickle", *fast_with(["--input-shape", "1,1,32,32"]), "--out", tmp_path / "o"],
                          capfd)
    assert code == 2
    assert_one_error_line(lines, "[2, 1, 32, 32]", "--input-shape")


def test_traceback_only_with_debug(model_pt2, tmp_path, capfd):
    with pytest.raises(GrailcError, match="ratio 1.0"):
        run_cli([model_pt2, *FAST, "--ratio", "1.0", "--debug", "--out", tmp_path / "out"], capfd)
    assert not (tmp_path / "out").exists()


def test_model_that_fails_to_trace_names_the_construct(tmp_path, capfd):
    path = tmp_path / "branchy.pt"
    torch.save(tiny(cls=DataDependentBranch), path)
    code, lines = run_cli([path, "--trust-pickle", *FAST, "--out", tmp_path / "out"], capfd)
    assert code == 2
    line = assert_one_error_line(lines, "could not be traced", "data-dependent")
    assert "helpers.py:" in line and "in forward: if x.sum() > 0:" in line, "the error must quote the failing line"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cls, op", [(CumsumBetweenConvs, "cumsum"), (FlipBetweenConvs, "flip")])
def test_unknown_op_pins_its_group_and_the_compile_goes_on(cls, op, tmp_path, capfd):
    path = save_pt2(tiny(cls=cls), tmp_path / f"{op}.pt2")
    out = tmp_path / "out"

    code, lines = run_cli([path, *FAST, "--out", out], capfd)

    assert code == 0, lines
    report = json.loads((out / "report.json").read_text())
    assert [u["node"] for u in report["unknown_ops"]] == [op]
    assert op in report["unknown_ops"][0]["op"]
    pinned = [g for g in report["groups"] if g["pinned"] and f"unknown op aten.{op}" in g["pinned"]]
    assert pinned and all(g["kept"] == g["size"] for g in pinned)
    assert any("conv1" in g["producers"] for g in pinned), "the group the op reads must be pinned"
    assert any(g["kept"] < g["size"] for g in report["groups"]), "the rest of the model is still pruned"
    assert report["verification"]["permutation_error"] <= 1e-5
