"""Shared pieces of the robustness tests: tiny models, crafted files, and the CLI run in-process."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from grailc.cli import main

INPUT_SHAPE = (1, 3, 32, 32)
SHAPE_FLAG = ",".join(str(d) for d in INPUT_SHAPE)
# A compile that takes about a second: random data, three small batches (one held out), no ONNX, no progress bars.
FAST = ["--calib", "random", "--input-shape", SHAPE_FLAG, "--calib-batches", "3", "--batch-size", "4",
        "--held-out", "1", "--no-onnx", "--quiet"]
MODEL_FILES = ("model.pt2", "model.onnx")


def fast_with(extra: list) -> list:
    """FAST's flags, then ``extra``; an --input-shape in ``extra`` replaces FAST's (repeated, it would name a
    second model input)."""
    base = list(FAST)
    if "--input-shape" in extra:
        del base[base.index("--input-shape") : base.index("--input-shape") + 2]
    return [*base, *extra]


class Tiny(nn.Module):
    """conv-BN-ReLU, conv-ReLU, global pool, linear: two prunable groups."""

    def __init__(self, width: int = 8, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def stem(self, x):
        return torch.relu(self.bn1(self.conv1(x)))

    def head(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv2(x))), 1))

    def forward(self, x):
        return self.head(self.stem(x))


class DataDependentBranch(Tiny):
    """Python control flow on a tensor value: torch.export cannot capture it."""

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return super().forward(x)


class CumsumBetweenConvs(Tiny):
    """An op the analysis has no rule for between the two convs."""

    def forward(self, x):
        return self.head(torch.cumsum(self.stem(x), dim=1))


class FlipBetweenConvs(Tiny):
    """flip of the channel axis: an op without a table row."""

    def forward(self, x):
        return self.head(self.stem(x).flip(1))


class LogOfNegatives(Tiny):
    """log of a conv output: NaN inside the network for any input."""

    def forward(self, x):
        return self.head(torch.log(self.conv1(x) - 100.0))


def tiny(width: int = 8, cls=Tiny, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = cls(width)
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.1, 0.1)
        model.bn1.running_var.uniform_(0.5, 1.5)
    return model.eval()


def save_pt2(model: nn.Module, path, dtype: torch.dtype = torch.float32) -> Path:
    """torch.export.save with a dynamic batch axis."""
    example = torch.randn(2, *INPUT_SHAPE[1:]).to(dtype)
    program = torch.export.export(model.to(dtype).eval(), (example,), dynamic_shapes=({0: Dim("batch")},))
    torch.export.save(program, str(path))
    return Path(path)


class WritesMarkerWhenUnpickled:
    """A payload that creates a file when unpickled, standing in for arbitrary code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pt2_with_evil_sample_inputs(good: Path, evil: Path, marker: Path) -> Path:
    """A copy of a .pt2 whose sample inputs are a pickle that writes ``marker`` when loaded.

    ``torch.export.load`` retries such a member with ``weights_only=False``, so a plain load runs the payload.
    """
    payload = io.BytesIO()
    torch.save(WritesMarkerWhenUnpickled(marker), payload)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if "/sample_inputs/" in info.filename:
                data = payload.getvalue()
            dst.writestr(info, data)
    return evil


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_cli(argv: list[str], capfd) -> tuple[int, list[str]]:
    """``grailc compress ARGV`` in this process: the exit code and the non-empty lines written to stderr."""
    capfd.readouterr()
    code = main(["compress", *map(str, argv)])
    err = capfd.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_one_error_line(lines: list[str], *needles: str) -> str:
    """Exactly one line on stderr, starting 'grailc: error:', holding every needle (case-insensitive)."""
    assert len(lines) == 1, "\n".join(lines)
    line = lines[0]
    assert line.startswith("grailc: error:"), line
    assert "Traceback" not in line
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


def model_files(out) -> list[str]:
    out = Path(out)
    return [name for name in MODEL_FILES if (out / name).exists()] if out.is_dir() else []


def leftovers(folder) -> list[str]:
    """Staging or set-aside folders that a run left behind in ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir() if ".grailc-" in p.name)
