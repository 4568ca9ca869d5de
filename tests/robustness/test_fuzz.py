"""Requirement 7: fuzzing.

(a) Random small CNNs (float32, sometimes float16/bfloat16) through ``grailc.compress``: a verified result or a
GrailcError, never another exception (nor an internal error, exit code 4).
(b) Random command lines through ``grailc.cli.main``: exit 0, 2 or 3, never a crash, and no model file unless the
exit is 0.

Examples are derandomized (the same cases every run) so that the suite's time and outcome are stable; the counts
of what ran are printed at the end of each test."""

from __future__ import annotations

import io
import itertools
import math
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import grailc
from grailc.cli import main
from grailc.errors import GrailcError

from .helpers import INPUT_SHAPE, WritesMarkerWhenUnpickled, leftovers, model_files, save_pt2, sha256, tiny

GRAPH_EXAMPLES = 60
CLI_EXAMPLES = 60
FUZZ = settings(max_examples=GRAPH_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- (a) random graphs ------------------------------------------------------------------------------------------

UNKNOWN_OPS = ("cumsum", "transpose", "flip", "channel_gate")


def randomize_batch_norm(bn: nn.BatchNorm2d, generator: torch.Generator) -> nn.BatchNorm2d:
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
        bn.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=generator) * 0.1)
    return bn


class Block(nn.Module):
    """One layer of a fuzzed network, built from a spec tuple ``(kind, *params)``."""

    def __init__(self, spec: tuple, c_in: int, generator: torch.Generator):
        super().__init__()
        self.spec = spec
        kind = spec[0]
        if kind == "conv":
            _, c_out, k, bn, act = spec
            self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
            self.bn = randomize_batch_norm(nn.BatchNorm2d(c_out), generator) if bn else None
            self.c_out = c_out
        elif kind == "depthwise":
            _, k, bn, act = spec
            self.conv = nn.Conv2d(c_in, c_in, k, padding=k // 2, groups=c_in)
            self.bn = randomize_batch_norm(nn.BatchNorm2d(c_in), generator) if bn else None
            self.c_out = c_in
        elif kind == "residual":
            _, hidden = spec
            self.conv1 = nn.Conv2d(c_in, hidden, 3, padding=1)
            self.conv2 = nn.Conv2d(hidden, c_in, 1)
            self.c_out = c_in
        elif kind == "concat":
            _, w1, w2 = spec
            self.left = nn.Conv2d(c_in, w1, 1)
            self.right = nn.Conv2d(c_in, w2, 3, padding=1)
            self.c_out = w1 + w2
        else:  # pool, unknown
            self.c_out = c_in

    def forward(self, x):
        kind = self.spec[0]
        if kind in ("conv", "depthwise"):
            x = self.conv(x)
            if self.bn is not None:
                x = self.bn(x)
            return torch.relu(x) if self.spec[-1] else x
        if kind == "residual":
            return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        if kind == "concat":
            return torch.relu(torch.cat([self.left(x), self.right(x)], dim=1))
        if kind == "pool":
            return F.max_pool2d(x, 2) if self.spec[1] == "max" else F.avg_pool2d(x, 2)
        op = self.spec[1]
        if op == "cumsum":
            return torch.cumsum(x, dim=1)
        if op == "transpose":
            return x.transpose(2, 3)
        if op == "flip":
            return torch.flip(x, dims=[1])
        return x * torch.sigmoid(x.mean(dim=1, keepdim=True))  # channel_gate: a reduction over channels


class FuzzNet(nn.Module):
    def __init__(self, layers: list[tuple], head: tuple, seed: int, classes: int = 5):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        blocks, c = [], INPUT_SHAPE[1]
        for spec in layers:
            blocks.append(Block(spec, c, generator))
            c = blocks[-1].c_out
        self.blocks = nn.ModuleList(blocks)
        self.head_kind = head[0]
        if self.head_kind == "gap_linear":
            self.fc = nn.Linear(c, classes)
        elif self.head_kind == "flatten_linear":
            self.fc1 = nn.Linear(4 * c, head[1])
            self.fc2 = nn.Linear(head[1], classes)
        else:
            self.out = nn.Conv2d(c, classes, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if self.head_kind == "gap_linear":
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if self.head_kind == "flatten_linear":
            return self.fc2(torch.relu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))))
        return self.out(x)


widths = st.integers(1, 12)
layer_specs = st.one_of(
    st.tuples(st.just("conv"), widths, st.sampled_from([1, 3]), st.booleans(), st.booleans()),
    st.tuples(st.just("depthwise"), st.sampled_from([3, 5]), st.booleans(), st.booleans()),
    st.tuples(st.just("residual"), widths),
    st.tuples(st.just("concat"), widths, widths),
    st.tuples(st.just("pool"), st.sampled_from(["max", "avg"])),
    st.tuples(st.just("unknown"), st.sampled_from(UNKNOWN_OPS)),
)
heads = st.one_of(
    st.tuples(st.just("gap_linear")),
    st.tuples(st.just("flatten_linear"), widths),
    st.tuples(st.just("conv_out")),
)
options = st.fixed_dictionaries({
    "ratio": st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]),
    "selector": st.sampled_from(["wanda", "magnitude"]),
    "compensate": st.sampled_from(["grail", "none"]),
    "lam": st.sampled_from([0.0, 1e-8, 1e-3, 1.0, 1e6]),
})
dtypes = st.sampled_from([torch.float32, torch.float32, torch.float32, torch.float16, torch.bfloat16])

GRAPH_COUNTS: Counter = Counter()


def relative_error(y, y_ref) -> float:
    y, y_ref = y.double(), y_ref.double()
    return float((y - y_ref).norm() / y_ref.norm().clamp_min(1e-30))


def calibration(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, *INPUT_SHAPE[1:], generator=generator) for _ in range(3)]


@FUZZ
@given(layers=st.lists(layer_specs, min_size=1, max_size=5), head=heads, opts=options, seed=st.integers(0, 2**16),
       dtype=dtypes)
def check_random_graph(layers, head, opts, seed, dtype):
    model = FuzzNet(layers, head, seed).eval().to(dtype)
    data = calibration(seed)
    GRAPH_COUNTS["cases"] += 1
    GRAPH_COUNTS["with unknown op"] += any(spec[0] == "unknown" for spec in layers)
    GRAPH_COUNTS[str(dtype).replace("torch.", "")] += 1
    try:
        result = grailc.compress(model, input_shape=INPUT_SHAPE, calib=data, calib_held_out=1, onnx=False, **opts)
    except GrailcError as e:
        assert e.exit_code != 4, f"internal error (a bug in grailc): {e.line()}"
        GRAPH_COUNTS["GrailcError"] += 1
        return
    x = data[-1].to(dtype)
    with torch.no_grad():
        y_ref, y = model(x), result.module(x)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert {p.dtype for p in result.module.parameters()} == {dtype}
    report = result.report
    assert report["verification"]["permutation_error"] <= 1e-5
    assert math.isfinite(report["output_error"]["relative_l2"])
    GRAPH_COUNTS["compressed"] += 1
    GRAPH_COUNTS["pruned something"] += report["params_after"] < report["params_before"]

    identity = grailc.compress(model, input_shape=INPUT_SHAPE, calib=data, calib_held_out=1, onnx=False, ratio=0.0)
    with torch.no_grad():
        assert relative_error(identity.module(x), y_ref) <= 1e-5


def test_random_graphs_compress_or_fail_clearly(capsys):
    GRAPH_COUNTS.clear()
    check_random_graph()
    with capsys.disabled():
        print(f"\nfuzz graphs: {dict(GRAPH_COUNTS)}")
    assert GRAPH_COUNTS["cases"] >= GRAPH_EXAMPLES and GRAPH_COUNTS["compressed"] > 0


# -- (b) random command lines -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every input the CLI fuzzer mixes: good and bad models, calibration sources and recipes."""
    root = tmp_path_factory.mktemp("fuzz-inputs")
    f = {"root": root}
    f["model"] = save_pt2(tiny(), root / "tiny.pt2")
    f["unknown_op"] = save_pt2(FuzzNet([("conv", 6, 3, True, True), ("unknown", "cumsum"), ("conv", 6, 1, False, True)],
                                       ("gap_linear",), seed=1), root / "cumsum.pt2")
    f["module"] = root / "module.pt"
    torch.save(tiny(), f["module"])
    f["corrupt"] = root / "corrupt.pt2"
    f["corrupt"].write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    f["evil"] = root / "evil.pt"
    torch.save(WritesMarkerWhenUnpickled(root / "pwned"), f["evil"])
    rng = np.random.default_rng(0)
    f["good_npy"] = root / "good.npy"
    np.save(f["good_npy"], rng.standard_normal((12, 3, 32, 32)).astype(np.float32))
    f["wrong_npy"] = root / "wrong.npy"
    np.save(f["wrong_npy"], rng.standard_normal((12, 1, 32, 32)).astype(np.float32))
    f["nan_npy"] = root / "nan.npy"
    np.save(f["nan_npy"], np.full((4, 3, 32, 32), np.nan, np.float32))
    f["images"] = root / "images"
    f["images"].mkdir()
    from PIL import Image

    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(f["images"] / f"{i}.png")
    f["bad_images"] = root / "bad_images"
    f["bad_images"].mkdir()
    (f["bad_images"] / "x.jpg").write_bytes(b"no jpeg")
    f["empty"] = root / "empty"
    f["empty"].mkdir()
    for name, text in {"good": 'ratio = 0.3\nselector = "magnitude"\n', "typo": "ratoi = 0.3\n",
                       "wrong_type": 'lam = "big"\n', "not_toml": "ratio = = 1\n",
                       "no_verify": 'pipeline = ["analyse", "calibrate", "select", "apply"]\n'}.items():
        f[f"recipe_{name}"] = root / f"{name}.toml"
        f[f"recipe_{name}"].write_text(text)
    f["zip_not_model"] = root / "archive.pt"
    with zipfile.ZipFile(f["zip_not_model"], "w") as z:
        z.writestr("a.txt", "hello")
    buffer = io.BytesIO()
    torch.save(tiny().state_dict(), buffer)
    f["state_dict"] = root / "state.pth"
    f["state_dict"].write_bytes(buffer.getvalue())
    return f


# Valid picks are listed more than once where they should come up more often.
MODELS = ["model", "model", "model", "model", "unknown_op", "unknown_op", "module", "corrupt", "evil",
          "zip_not_model", "state_dict", "missing", "torchvision:nosuchnet"]
CALIB = ["random", "random", "random", "good_npy", "images", "wrong_npy", "nan_npy", "bad_images", "empty", "missing"]
# flag -> (valid values, invalid values); a value that is a list is several arguments (nargs="+")
VALUES = {
    "--ratio": (["0", "0.3", "0.5", "0.9"], ["1.0", "-0.1", "nan", "inf", "abc"]),
    "--selector": (["wanda", "magnitude"], ["wandaa", ""]),
    "--compensate": (["grail", "none"], ["grial"]),
    "--lam": (["0", "1e-3", "1e6"], ["-1", "nan", "x"]),
    "--input-shape": (["1,3,32,32", "2,3,32,32"], ["1,1,32,32", "1,3,16,16", "a,b", "0,3,32,32", "1,3,32"]),
    "--calib-batches": (["2", "3"], ["0", "-1", "x"]),
    "--batch-size": (["1", "2", "4"], ["0"]),
    "--held-out": (["0", "1"], ["3", "-1"]),
    "--max-memory": (["8GiB", "1e3MiB"], ["1KiB", "100", "lots"]),
    "--seed": (["0", "7"], ["x"]),
    "--mean": ([["0.5"], ["0.5", "0.5", "0.5"]], [["0.1", "0.2"], ["x"]]),
    "--std": ([["0.25"], ["1", "1", "1"]], [["0", "1", "1"]]),
    "--weights": ([], ["state_dict", "missing"]),
    "--recipe": (["recipe_good"], ["recipe_typo", "recipe_wrong_type", "recipe_not_toml", "recipe_no_verify",
                                  "missing"]),
    "--no-such-flag": ([], ["1"]),
}
SWITCHES = ["--no-normalize", "--force", "--trust-pickle", "--sequential"]

command_lines = st.fixed_dictionaries({
    "model": st.sampled_from(MODELS),
    "calib": st.sampled_from(CALIB),
    # flag -> (pick an invalid value?, which one); three valid picks for one invalid
    "flags": st.dictionaries(st.sampled_from(sorted(VALUES)),
                             st.tuples(st.sampled_from([False, False, False, True]), st.integers(0, 100)),
                             max_size=4),
    "switches": st.sets(st.sampled_from(SWITCHES), max_size=2),
    "onnx": st.integers(0, 9),  # export ONNX in one case out of ten: it is slow
    "out_exists": st.booleans(),
})

CLI_COUNTS: Counter = Counter()
_case_ids = itertools.count()


def resolve(name: str, files: dict) -> str:
    if name == "missing":
        return str(files["root"] / "does-not-exist.pt2")
    return str(files[name]) if name in files else name


def build_argv(case: dict, files: dict, out: Path) -> list[str]:
    argv = ["compress", resolve(case["model"], files), "--calib", resolve(case["calib"], files),
            "--calib-batches", "3", "--batch-size", "4", "--held-out", "1", "--quiet", "--out", str(out)]
    if "--input-shape" not in case["flags"]:  # a repeated --input-shape would name a second model input
        argv += ["--input-shape", "1,3,32,32"]
    for flag, (invalid, pick) in sorted(case["flags"].items()):
        valid_values, invalid_values = VALUES[flag]
        values = invalid_values if invalid or not valid_values else valid_values
        value = values[pick % len(values)]
        argv += [flag, *([resolve(v, files) for v in value] if isinstance(value, list) else [resolve(value, files)])]
    argv += sorted(case["switches"])
    if case["onnx"]:
        argv.append("--no-onnx")
    return argv


def test_random_command_lines_exit_cleanly(files, capsys):
    CLI_COUNTS.clear()
    model_digest = sha256(files["model"])

    @settings(FUZZ, max_examples=CLI_EXAMPLES)
    @given(case=command_lines)
    def check(case):
        folder = files["root"] / f"case-{next(_case_ids)}"
        folder.mkdir()
        out = folder / "out"
        if case["out_exists"]:
            out.mkdir()
            (out / "old.txt").write_text("old")
        argv = build_argv(case, files, out)
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own usage error
            code = e.code
            assert code == 2, argv
            CLI_COUNTS["usage error"] += 1
        else:
            CLI_COUNTS[f"exit {code}"] += 1
        assert code in (0, 2, 3), f"exit {code} for {argv}"
        if code == 0:
            assert "model.pt2" in model_files(out), argv
        else:
            assert not model_files(out), f"model files written although the exit was {code}: {argv}"
            if case["out_exists"]:
                assert (out / "old.txt").exists() or code == 3
        assert not leftovers(folder), argv
        marker = files["root"] / "pwned"
        if "--trust-pickle" in argv:  # trusted on purpose: the payload may run, which is what the flag means
            marker.unlink(missing_ok=True)
        assert not marker.exists(), f"the crafted pickle ran without --trust-pickle: {argv}"
        CLI_COUNTS["cases"] += 1

    check()
    with capsys.disabled():
        print(f"\nfuzz command lines: {dict(CLI_COUNTS)}")
    assert sha256(files["model"]) == model_digest
    assert CLI_COUNTS["cases"] >= CLI_EXAMPLES and CLI_COUNTS["exit 0"] > 0 and CLI_COUNTS["exit 2"] > 0
