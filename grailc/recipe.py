"""Recipes: every setting of a compile, validated into dataclasses.

A recipe is a TOML file; CLI flags are shorthands that override its fields, and every field is an argument of
:func:`grailc.compress`. Unknown keys are rejected with a "did you mean".

```toml
ratio = 0.5                 # fraction of channels removed in every prunable group
selector = "auto"           # auto | gram | wanda | magnitude | random | fold (k-means, seeded by calib.seed) | ...
compensate = "auto"         # auto | grail+bias | grail (grail_fold) | none | bias
repair = false              # re-estimate BatchNorm statistics after apply (adds the 'repair' pass)
reconstruct = "off"         # block | layer | group: train windows against the dense model (the 'reconstruct' pass)
lam = 1e-3                  # ridge, relative to mean(diag G[K, K])
compensate_target = "auto"  # auto (stream when sequential, unless the hidden width is cut) | input | stream
kernel_solve = "auto"       # auto (taps when sequential) | taps (k x k convs over (channel, tap) pairs) | channels
exclude = ["layer4.*"]      # module-name patterns whose groups are never pruned
targets = ["channels", "heads"]  # which groups: channels (alias mlp), heads or vdims, embed (alias hidden: lossy)
multiple_of = 8             # every kept width a multiple of 8 (default "auto": 8 in groups of 64+ channels; 1: exact)
budget = "params=0.5"       # instead of one ratio everywhere: remove half the parameters (or macs=...), spread
budget_floor = 0.1          # across groups by score, every group keeping at least 10% of its units
[ratios]                    # per module pattern (first match wins)
"layer1.*" = 0.25
[calib]
source = "images/"          # a folder of images, a .npy/.pt tensor file, or "random"
batches = 8
batch_size = 16
held_out = 2                # batches kept aside to measure the output error
```

Top-level keys also include ``sequential`` (true, the default: Grams on the already-compressed upstream, group by
group; false: one pass on the dense model),
``magnitude_norm`` (1 or 2), ``max_memory`` ("8GiB"), ``keep_all_tol`` and ``pipeline``; ``[export]`` has ``onnx``,
``pt2`` and ``parity_tol``.
With ``reconstruct`` set, ``reconstruct_steps`` (Adam steps per window), ``reconstruct_lr``, ``reconstruct_batch``
(minibatch; 0: the calibration batches), ``reconstruct_params`` (all | norms+biases | lowrank),
``reconstruct_rank``, ``reconstruct_fed`` (compressed | dense) and ``reconstruct_optimizer`` (adam | rmsprop) tune
the 'reconstruct' pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import tomllib

from grailc.errors import RecipeError, did_you_mean

TARGETS = {"channels": "channels", "mlp": "channels", "heads": "heads", "vdims": "vdims", "embed": "embed",
           "hidden": "embed"}
DEFAULT_TARGETS = ["channels", "heads"]
# "auto" selector and compensator: the best label-free pair measured per mode (README, "The default pipeline"):
# sequential -> gram + grail+bias, one-shot -> wanda + grail; decoder LLMs (hf:) -> wanda_sp + grail
AUTO = {True: ("gram", "grail+bias"), False: ("wanda", "grail")}
AUTO_LLM = ("wanda_sp", "grail")
COMPENSATE_TARGETS = ("input", "stream")
KERNEL_SOLVES = ("channels", "taps")
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
    selector: str = "auto"  # auto: the best measured for the mode (AUTO), resolved when a compile starts
    compensate: str = "auto"
    lam: float = 1e-3
    # input: each consumer rebuilds its dense input; stream (sequential only): a linear consumer whose output is added
    # to a residual stream rebuilds the dense stream there (see passes/calibrate.py, ``stream_writers``); auto: stream
    # where it applies (sequential calibration, residual width not cut), else input
    compensate_target: str = "auto"
    # channels: one B for all taps of a k x k convolution consumer (W' = W B per tap); taps (sequential only): its
    # columns solved over (channel, tap) pairs from its patches (see passes/taps.py); auto: taps when sequential
    kernel_solve: str = "auto"
    magnitude_norm: int = 1
    sequential: bool = True  # Grams consumer by consumer on the already-compressed upstream (False: one-shot, dense)
    repair: bool = False  # the 'repair' pass after 'apply': BatchNorm statistics re-estimated on calibration data
    # the 'reconstruct' pass after 'apply' (and 'repair'): windows trained with Adam against the dense model
    reconstruct: str = "off"  # off | block | layer | group
    reconstruct_steps: int = 300  # Adam steps per window, one minibatch each
    reconstruct_lr: float = 3e-3
    reconstruct_batch: int = 0  # minibatch size (0: the calibration batches as they are)
    reconstruct_params: str = "all"  # all | norms+biases | lowrank
    reconstruct_rank: int = 8  # rank of the update with reconstruct_params = "lowrank"
    reconstruct_fed: str = "compressed"  # window inputs: compressed (reconstructed upstream) | dense (mapped)
    reconstruct_optimizer: str = "adam"  # adam | rmsprop (Wanda++'s regional optimisation)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # every kept width (channels, heads * head_dim) a multiple of this; "auto": 8 in groups at least 64 channels wide
    multiple_of: int | str = "auto"
    exclude: list[str] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    budget: str = ""  # "params=0.5" / "macs=0.5": one target for the model, spread across groups by score
    budget_floor: float = 0.1  # under a budget, every group keeps at least this fraction of its units
    input_shape: list[int] | list[list[int]] | None = None  # one shape, or one per model input
    max_memory: str = "8GiB"
    keep_all_tol: float = 1e-5
    pipeline: list[str] = field(default_factory=lambda: list(DEFAULT_PIPELINE))
    calib: CalibSpec = field(default_factory=CalibSpec)
    export: ExportSpec = field(default_factory=ExportSpec)

    def resolved(self, llm: bool = False) -> Recipe:
        """This recipe with ``auto`` replaced by the mode's defaults (``AUTO``; ``AUTO_LLM`` for decoder LLMs)."""
        selector, compensate = AUTO_LLM if llm else AUTO[self.sequential]
        target = "stream" if self.sequential and not self._cuts_embed() else "input"
        return dataclasses.replace(self, selector=selector if self.selector == "auto" else self.selector,
                                   compensate=compensate if self.compensate == "auto" else self.compensate,
                                   compensate_target=target if self.compensate_target == "auto"
                                   else self.compensate_target,
                                   kernel_solve=("taps" if self.sequential else "channels")
                                   if self.kernel_solve == "auto" else self.kernel_solve)

    def _cuts_embed(self) -> bool:
        return "embed" in {TARGETS.get(t) for t in self.targets}

    @property
    def max_memory_bytes(self) -> int:
        return parse_bytes(self.max_memory)

    def validate(self) -> Recipe:
        from grailc.errors import check_choice
        from grailc.registry import COMPENSATORS, SELECTORS, load_builtin

        _check_types(self)
        if self.repair and "repair" not in self.pipeline:
            at = self.pipeline.index("apply") + 1 if "apply" in self.pipeline else len(self.pipeline) - 1
            self.pipeline = [*self.pipeline[:at], "repair", *self.pipeline[at:]]
        self._insert_reconstruct()
        _check_pipeline(self.pipeline)
        _check_finite_numbers(self)
        load_builtin()
        if not 0.0 <= self.ratio < 1.0:
            raise RecipeError(f"ratio {self.ratio} is outside [0, 1)", fix="give the fraction of channels to remove")
        for pattern, r in self.ratios.items():
            if not 0.0 <= r < 1.0:
                raise RecipeError(f"ratio {r} for pattern {pattern!r} is outside [0, 1)")
        if self.selector != "auto":
            check_choice("selector", self.selector, SELECTORS)
        if self.compensate != "auto":
            check_choice("compensator", self.compensate, COMPENSATORS)
        if self.lam < 0:
            raise RecipeError(f"lam {self.lam} is negative", fix="the ridge must be >= 0")
        check_choice("compensate_target", self.compensate_target, ("auto", *COMPENSATE_TARGETS))
        if self.compensate_target == "stream" and not self.sequential:
            raise RecipeError("compensate_target stream needs sequential calibration: the drift of the residual "
                              "stream is the dense run's against the compressed one's",
                              fix="drop --one-shot (or sequential = false), or use --compensate-target input")
        if self.compensate_target == "stream" and self._cuts_embed():
            raise RecipeError("compensate_target stream cannot be combined with --targets hidden (embed): the residual "
                              "stream itself is narrowed, so the dense and the compressed stream are not one space",
                              fix="use --compensate-target input (or auto) with --targets hidden")
        check_choice("kernel_solve", self.kernel_solve, ("auto", *KERNEL_SOLVES))
        if self.kernel_solve == "taps" and not self.sequential:
            raise RecipeError("kernel_solve taps needs sequential calibration: a convolution's patches are recorded "
                              "at the consumer, after its group is selected",
                              fix="drop --one-shot (or sequential = false), or use --kernel-solve channels")
        for t in self.targets:
            check_choice("target", t, TARGETS)
        if {"heads", "vdims"} <= {TARGETS[t] for t in self.targets}:
            raise RecipeError("targets heads and vdims exclude each other: an attention's value is grouped either by "
                              "whole heads or by the value dims inside them",
                              fix="choose one of them (heads removes whole heads, vdims narrows every head)")
        if self.budget:
            from grailc.passes.select.global_budget import parse_budget

            parse_budget(self.budget)
        if not 0.0 < self.budget_floor <= 1.0:
            raise RecipeError(f"budget_floor {self.budget_floor} is outside (0, 1]",
                              fix="give the fraction of each group's units kept at least, e.g. 0.1")
        if self.multiple_of != "auto" and (isinstance(self.multiple_of, str) or self.multiple_of < 1):
            raise RecipeError(f"multiple_of {self.multiple_of!r} must be \"auto\" or a whole number at least 1",
                              fix="1 keeps exact widths; 8 rounds every kept width to a multiple of 8")
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
        if c.std is not None and not all(v > 0 for v in c.std):
            raise RecipeError(f"calib.std {c.std} must be positive: images are divided by it",
                              fix="give each channel's standard deviation, e.g. --std 0.229 0.224 0.225")
        if self.input_shape is not None:  # one shape, or a list of shapes (one per model input)
            several = bool(self.input_shape) and all(isinstance(s, list) for s in self.input_shape)
            for shape in self.input_shape if several else [self.input_shape]:
                if len(shape) < 1 or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in shape):
                    raise RecipeError(f"input shape {self.input_shape} must be positive integers, e.g. 1,3,224,224 "
                                      "(or a list of such shapes, one per model input)")
        self._check_reconstruct()
        self.max_memory_bytes  # noqa: B018 - validates the text
        return self

    def _insert_reconstruct(self) -> None:
        """reconstruct != "off" runs the 'reconstruct' pass after 'apply' and 'repair' (inserted when absent)."""
        if self.reconstruct != "off" and "reconstruct" not in self.pipeline:
            after = [i + 1 for i, name in enumerate(self.pipeline) if name in ("apply", "repair")]
            at = max(after) if after else len(self.pipeline) - 1
            self.pipeline = [*self.pipeline[:at], "reconstruct", *self.pipeline[at:]]

    def _check_reconstruct(self) -> None:
        from grailc.errors import check_choice
        from grailc.passes.reconstruct import FED, KINDS, OPTIMIZERS, PARAMS

        check_choice("reconstruct kind", self.reconstruct, KINDS)
        check_choice("reconstruct_optimizer", self.reconstruct_optimizer, OPTIMIZERS)
        check_choice("reconstruct_params", self.reconstruct_params, PARAMS)
        check_choice("reconstruct_fed", self.reconstruct_fed, FED)
        if "reconstruct" in self.pipeline and self.reconstruct == "off":
            raise RecipeError("the pipeline names 'reconstruct' but reconstruct = \"off\"",
                              fix='set reconstruct = "block" (or layer, group), or drop it from the pipeline')
        for name in ("reconstruct_steps", "reconstruct_batch"):
            if getattr(self, name) < 0:
                raise RecipeError(f"{name} {getattr(self, name)} is negative", fix=f"give {name} >= 0")
        if self.reconstruct_rank < 1:
            raise RecipeError(f"reconstruct_rank {self.reconstruct_rank} must be at least 1")
        if not self.reconstruct_lr > 0:
            raise RecipeError(f"reconstruct_lr {self.reconstruct_lr} must be positive", fix="e.g. 3e-3")


# pass -> one that must come first
PASS_NEEDS = {"select": "calibrate", "compensate": "select", "apply": "select", "repair": "apply",
              "reconstruct": "apply"}


def _check_pipeline(pipeline: list[str]) -> None:
    """A pipeline runs each pass once, after what it reads, and ends with 'verify' (nothing unchecked is written)."""
    fix = f"use the default pipeline {DEFAULT_PIPELINE}, or a prefix of it followed by 'verify'"
    for i, name in enumerate(pipeline):
        if name in pipeline[:i]:
            raise RecipeError(f"pipeline runs pass {name!r} twice", fix=fix)
        need = PASS_NEEDS.get(name)
        if need is not None and need not in pipeline[:i]:
            raise RecipeError(f"pipeline pass {name!r} needs {need!r} before it", fix=fix)
    if not pipeline or pipeline[-1] != "verify":
        raise RecipeError(f"pipeline {pipeline} does not end with 'verify': every result is checked before it is "
                          "written", fix=fix)


TYPE_NAMES = {bool: "boolean (true/false)", int: "integer", float: "number", str: "string", list: "list",
              dict: "table", type(None): "nothing"}
def parse_multiple(text: str) -> int | str:
    """A ``multiple_of`` written as text (a flag): ``auto`` or a whole number; ValueError otherwise."""
    return text if text == "auto" else int(text)


ALSO_ACCEPTED = {"max_memory": int, "multiple_of": int}  # a plain number of bytes; a fixed multiple


def _check_types(recipe: Recipe) -> None:
    """Every field holds the type of its default (ints count as floats), so that validation compares numbers."""
    for prefix, spec in (("", recipe), ("calib.", recipe.calib), ("export.", recipe.export)):
        for f in dataclasses.fields(spec):
            if f.name in ("calib", "export"):
                continue
            value = getattr(spec, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            expected = type(default) if default is not None else (list if value is not None else type(None))
            if not _is_a(value, expected) and not _is_a(value, ALSO_ACCEPTED.get(f.name, type(None))):
                raise RecipeError(
                    f"recipe field {prefix}{f.name} must be a {TYPE_NAMES[expected]}, got {value!r} "
                    f"({type(value).__name__})",
                    fix=f"write it like {prefix}{f.name} = {json.dumps(default)}" if default is not None else None,
                )
    for name, items, kind in (("exclude", recipe.exclude, str), ("pipeline", recipe.pipeline, str),
                              ("targets", recipe.targets, str)):
        if not all(isinstance(item, kind) for item in items):
            raise RecipeError(f"recipe field {name} must be a list of strings, got {items!r}")
    for pattern, ratio in recipe.ratios.items():
        if not _is_a(ratio, float):
            raise RecipeError(f"recipe ratio for {pattern!r} must be a number, got {ratio!r}")


def _is_a(value, expected: type) -> bool:
    """isinstance, where an int is a float too but a bool is only a bool."""
    if isinstance(value, bool) and expected is not bool:
        return False
    return isinstance(value, (int, float)) if expected is float else isinstance(value, expected)


def _check_finite_numbers(recipe: Recipe) -> Recipe:
    """NaN passes every range check (all comparisons are false): refuse non-finite numbers by name."""
    numbers = {"lam": recipe.lam, "keep_all_tol": recipe.keep_all_tol, "parity_tol": recipe.export.parity_tol,
               "reconstruct_lr": recipe.reconstruct_lr}
    for name, value in numbers.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise RecipeError(f"{name} {value} is not a finite number", fix=f"give {name} as a number like 1e-3")
    return recipe


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
