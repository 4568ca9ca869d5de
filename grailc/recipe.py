"""Recipes: every setting of a compile, validated into dataclasses.

A recipe is a TOML file; CLI flags are shorthands that override its fields, and every field is an argument of
:func:`grailc.compress`. Unknown keys are rejected with a "did you mean".

```toml
ratio = 0.5                 # fraction of channels removed in every prunable group
selector = "wanda"          # magnitude | wanda
compensate = "grail"        # grail | none
lam = 1e-3                  # ridge, relative to mean(diag G[K, K])
exclude = ["layer4.*"]      # module-name patterns whose groups are never pruned
[ratios]                    # per module pattern (first match wins)
"layer1.*" = 0.25
[calib]
source = "images/"          # a folder of images, a .npy/.pt tensor file, or "random"
batches = 8
batch_size = 16
held_out = 2                # batches kept aside to measure the output error
```

Top-level keys also include ``sequential`` (Grams on the already-compressed upstream, group by group),
``magnitude_norm`` (1 or 2), ``max_memory`` ("8GiB"), ``keep_all_tol`` and ``pipeline``; ``[export]`` has ``onnx``,
``pt2`` and ``parity_tol``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import tomllib

from grailc.errors import RecipeError, did_you_mean

DEFAULT_PIPELINE = ["analyse", "calibrate", "select", "compensate", "apply", "verify"]


@dataclass
class CalibSpec:
    source: str = "random"
    batches: int = 8
    batch_size: int = 16
    held_out: int = 2
    normalize: bool = True
    mean: list[float] | None = None
    std: list[float] | None = None
    seed: int = 0


@dataclass
class ExportSpec:
    onnx: bool = True
    pt2: bool = True
    parity_tol: float = 1e-3  # max |ONNX - PyTorch| relative to max |PyTorch|


@dataclass
class Recipe:
    ratio: float = 0.5
    selector: str = "wanda"
    compensate: str = "grail"
    lam: float = 1e-3
    magnitude_norm: int = 1
    sequential: bool = False  # Grams taken group by group on the already-compressed upstream
    exclude: list[str] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    input_shape: list[int] | None = None
    max_memory: str = "8GiB"
    keep_all_tol: float = 1e-5
    pipeline: list[str] = field(default_factory=lambda: list(DEFAULT_PIPELINE))
    calib: CalibSpec = field(default_factory=CalibSpec)
    export: ExportSpec = field(default_factory=ExportSpec)

    @property
    def max_memory_bytes(self) -> int:
        return parse_bytes(self.max_memory)

    def validate(self) -> Recipe:
        from grailc.errors import check_choice
        from grailc.registry import COMPENSATORS, SELECTORS, load_builtin

        load_builtin()
        if not 0.0 <= self.ratio < 1.0:
            raise RecipeError(f"ratio {self.ratio} is outside [0, 1)", fix="give the fraction of channels to remove")
        for pattern, r in self.ratios.items():
            if not 0.0 <= r < 1.0:
                raise RecipeError(f"ratio {r} for pattern {pattern!r} is outside [0, 1)")
        check_choice("selector", self.selector, SELECTORS)
        check_choice("compensator", self.compensate, COMPENSATORS)
        if self.lam < 0:
            raise RecipeError(f"lam {self.lam} is negative", fix="the ridge must be >= 0")
        if self.magnitude_norm not in (1, 2):
            raise RecipeError(f"magnitude_norm {self.magnitude_norm} is not 1 or 2")
        c = self.calib
        for name in ("batches", "batch_size"):
            if getattr(c, name) < 1:
                raise RecipeError(f"calib.{name} must be at least 1")
        if c.held_out < 0 or c.held_out >= c.batches:
            raise RecipeError(
                f"calib.held_out = {c.held_out} must be in [0, batches={c.batches})",
                fix="keep at least one batch for fitting",
            )
        if self.input_shape is not None:
            if len(self.input_shape) < 1 or any(not isinstance(d, int) or d < 1 for d in self.input_shape):
                raise RecipeError(f"input shape {self.input_shape} must be positive integers, e.g. 1,3,224,224")
        self.max_memory_bytes  # noqa: B018 - validates the text
        return self


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text) -> int:
    """'8GiB' -> 8589934592; plain numbers are bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise RecipeError(f"cannot read the memory size {text!r}", fix="write it like 512MiB or 8GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_shape(text: str) -> list[int]:
    """'1,3,224,224' -> [1, 3, 224, 224]."""
    try:
        shape = [int(p) for p in str(text).replace("x", ",").split(",") if p.strip()]
    except ValueError:
        shape = []
    if not shape or any(d < 1 for d in shape):
        raise RecipeError(f"cannot read the input shape {text!r}", fix="write it like 1,3,224,224")
    return shape


def _build(cls, data: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise RecipeError(
                f"unknown recipe key {where}{key!r}{did_you_mean(key, known)}",
                fix=f"known keys: {', '.join(known)}",
            )
        sub = {"calib": CalibSpec, "export": ExportSpec}.get(key) if cls is Recipe else None
        if sub is not None:
            if not isinstance(value, dict):
                raise RecipeError(f"recipe key {key!r} must be a table [{key}]")
            value = _build(sub, value, f"{key}.")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise RecipeError(f"invalid recipe values: {e}") from e


def recipe_from_dict(data: dict) -> Recipe:
    return _build(Recipe, data, "")


def load_recipe(path) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise RecipeError(f"recipe file {path} does not exist") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe file {path} is not valid TOML: {e}") from e
    except OSError as e:
        raise RecipeError(f"cannot read recipe file {path}: {e.strerror}") from e
    return recipe_from_dict(data)
