"""The Python API: ``grailc.compress(model, input_shape=..., calib=..., ratio=..., selector=...) -> Result``.

The CLI is a thin shell over this; every recipe field is a keyword argument here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import linecache
import logging
import math
import re
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import fx

from grailc.context import Context
from grailc.errors import CalibrationError, GrailcError, RecipeError, TraceError, VerificationError
from grailc.export import onnx_parity, reexport, save_onnx, save_pt2
from grailc.metrics import count_macs, count_params, latency_ms
from grailc.outputs import StagedOutput, atomic_write_text
from grailc.passmanager import run_pipeline
from grailc.recipe import DEFAULT_PIPELINE, CalibSpec, ExportSpec, Recipe
from grailc.report import group_records, summary, versions
from grailc.trace import example_batch, trace


@dataclasses.dataclass
class Result:
    """A compressed model, its report, and what is needed to export it."""

    module: fx.GraphModule
    report: dict
    reference: fx.GraphModule
    example: torch.Tensor
    held_out: list[torch.Tensor]
    recipe: Recipe
    _program: torch.export.ExportedProgram | None = None

    def program(self) -> torch.export.ExportedProgram:
        if self._program is None:
            self._program = reexport(self.module, self.example)
        return self._program

    def export_onnx(self, path) -> dict:
        """Write ONNX to ``path`` and check it against PyTorch with ONNX Runtime; returns the parity figures."""
        path = Path(path)
        save_onnx(self.program(), self.example, path)
        try:
            parity = onnx_parity(path, self.module, self.held_out or [self.example])
        except Exception as e:  # ONNX Runtime rejecting the model is a failed check, reported like a parity miss
            text = str(e).strip().splitlines()
            self.report["failure"] = f"ONNX Runtime cannot run the exported model: {type(e).__name__}: " + (
                text[0][:300] if text else ""
            )
            error = VerificationError(self.report["failure"], fix="use the .pt2 output, or --no-onnx")
            error.report = self.report
            raise error from e
        parity["path"] = str(path)
        return parity

    def save(self, out_dir, *, force: bool = False, onnx: bool = True, pt2: bool = True) -> Path:
        """Write model.pt2, model.onnx and report.json into ``out_dir`` atomically (all or nothing)."""
        with StagedOutput(out_dir, force=force) as staged:
            self.write_into(staged, onnx=onnx, pt2=pt2)
            return staged.commit()

    def write_into(self, staged: StagedOutput, *, onnx: bool, pt2: bool) -> None:
        start = time.perf_counter()
        if pt2:
            program, path = self.program(), staged.path("model.pt2")
            try:
                save_pt2(program, path)
            except OSError as e:
                raise GrailcError(
                    f"cannot write model.pt2 ({e.strerror or e})", where=str(path),
                    fix="check that the output folder is writable and the disk has space",
                ) from e
            self.report["pt2"] = {"path": "model.pt2", "load_with": "torch.export.load(path).module()"}
        skip_onnx = onnx and ONNX_UNSUPPORTED.get(self.example.dtype)
        if skip_onnx:
            self.report["onnx"] = {"skipped": skip_onnx}
            onnx = False
        if onnx:
            parity = self.export_onnx(staged.path("model.onnx"))
            parity["path"] = "model.onnx"
            parity["tolerance"] = tol = parity_tolerance(self.recipe.export.parity_tol, self.example.dtype)
            self.report["onnx"] = parity
        self.report["timings"]["export"] = round(time.perf_counter() - start, 4)
        if onnx and not parity["relative_diff"] <= tol:
            self.report["failure"] = (
                f"ONNX Runtime output differs from PyTorch by {parity['max_abs_diff']:.3g} "
                f"({parity['relative_diff']:.3g} relative > {tol:g})"
            )
            error = VerificationError(self.report["failure"], fix="report it; use the .pt2 output meanwhile")
            error.report = self.report
            raise error
        atomic_write_text(staged.path("report.json"), json.dumps(self.report, indent=2, default=str))


ONNX_UNSUPPORTED = {
    torch.bfloat16: "bfloat16 models are not exported to ONNX (ONNX Runtime's CPU provider and numpy have no "
    "bfloat16); use model.pt2, or compress a float32 copy for ONNX",
}
PARITY_ULPS = 8  # ONNX Runtime and PyTorch may sum in another order: allow this many ulps of the model's dtype


def parity_tolerance(tol: float, dtype: torch.dtype) -> float:
    """The recipe's ONNX parity tolerance, widened to what the model's float type can resolve."""
    return max(tol, PARITY_ULPS * torch.finfo(dtype).eps) if dtype.is_floating_point else tol


def make_recipe(recipe: Recipe | None = None, **overrides) -> Recipe:
    """A recipe from a base and keyword overrides (``calib`` / ``export`` fields may be given flat)."""
    recipe = copy.deepcopy(recipe) if recipe is not None else Recipe()
    calib_fields = {f.name for f in dataclasses.fields(CalibSpec)}
    export_fields = {f.name for f in dataclasses.fields(ExportSpec)}
    for key, value in overrides.items():
        if value is None:
            continue
        if hasattr(recipe, key) and key not in ("calib", "export"):
            setattr(recipe, key, value)
        elif key.startswith("calib_") and key[6:] in calib_fields:
            setattr(recipe.calib, key[6:], value)
        elif key in export_fields:
            setattr(recipe.export, key, value)
        else:
            from grailc.errors import RecipeError, did_you_mean

            known = [f.name for f in dataclasses.fields(Recipe)]
            raise RecipeError(f"unknown option {key!r}{did_you_mean(key, known)}")
    _check_types(recipe)
    _check_pipeline(recipe.pipeline)
    return _check_finite_numbers(recipe.validate())


PASS_NEEDS = {"select": "calibrate", "compensate": "select", "apply": "select"}  # pass -> one that must come first


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
ALSO_ACCEPTED = {"max_memory": int}  # a plain number of bytes


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
    for name, items, kind in (("exclude", recipe.exclude, str), ("pipeline", recipe.pipeline, str)):
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
    numbers = {"lam": recipe.lam, "keep_all_tol": recipe.keep_all_tol, "parity_tol": recipe.export.parity_tol}
    for name, value in numbers.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise RecipeError(f"{name} {value} is not a finite number", fix=f"give {name} as a number like 1e-3")
    return recipe


def _as_batches(calib) -> list[torch.Tensor]:
    if isinstance(calib, torch.Tensor):
        return [calib]
    batches = []
    for item in calib:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise CalibrationError(f"calibration batches must be tensors, got {type(x).__name__}")
        batches.append(x)
    if not batches:
        raise CalibrationError("no calibration batches were given")
    return batches


def _user_input(program: torch.export.ExportedProgram) -> torch.Tensor | None:
    """The (fake) tensor a program's first user input was exported with."""
    user_inputs = {s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and node.name in user_inputs and isinstance(val, torch.Tensor):
            return val
    return None


def model_dtype(model) -> torch.dtype:
    """The floating type the model computes in: its input's (ExportedProgram) or its first float parameter's."""
    if isinstance(model, torch.export.ExportedProgram):
        val = _user_input(model)
        if val is not None and val.is_floating_point():
            return val.dtype
        tensors = model.state_dict.values()
    else:
        tensors = [*model.parameters(), *model.buffers()]
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def _check_input_shape(model, shape: tuple[int, ...]) -> None:
    """An input shape that does not fit an exported program is a bad flag, not a tracing failure."""
    if not isinstance(model, torch.export.ExportedProgram):
        return
    val = _user_input(model)
    if val is None:
        return
    spec = [d if isinstance(d, int) else None for d in val.shape]
    fits = len(spec) == len(shape) and all(s is None or s == d for s, d in zip(spec[1:], shape[1:]))
    if not fits:
        expected = "[" + ", ".join(["N", *("?" if s is None else str(s) for s in spec[1:])]) + "]"
        raise RecipeError(
            f"input shape {list(shape)} does not fit the model, which was exported for inputs {expected}",
            fix="give --input-shape (or input_shape=) in the model's layout, batch dimension first",
        )


def _graph_of(model):
    """An nn.Module to trace; an ExportedProgram's guards (which pin the batch it was saved with) are left out."""
    if isinstance(model, torch.export.ExportedProgram):
        module = model.module(check_guards=False)
        module.validate_inputs = False  # its input check would also pin the saved batch size
        return module
    return model.eval() if not isinstance(model, fx.GraphModule) else model


def _check_runs_eagerly(module, example: torch.Tensor) -> None:
    """Run the model once before tracing, so that a wrong input shape is not reported as a tracing failure."""
    try:
        with torch.no_grad():
            module(example)
    except Exception as e:  # any failure on the plain model is about its input
        text = str(e).strip().splitlines()
        raise RecipeError(
            f"the model does not run on an input of shape {list(example.shape)} ({example.dtype}): "
            f"{type(e).__name__}: {text[0][:300] if text else ''}",
            fix="check --input-shape (or input_shape=): it must be the model's input, batch dimension first",
        ) from e


@contextlib.contextmanager
def _quiet_torch():
    """torch logs warnings, and fx prints whole graphs to stderr, when tracing fails; the TraceError says it all."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith("torch")]
    loggers.append(logging.getLogger("torch"))
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _quote_source_line(error: TraceError) -> None:
    """Add the failing line of the model's source to a TraceError that names it as 'file:line in function'."""
    found = re.fullmatch(r"(.+):(\d+) in \S+", error.where or "")
    code = linecache.getline(found.group(1), int(found.group(2))).strip() if found else ""
    if code:
        error.where += f": {code}"
        error.args = (error.line(),)


def _check_finite_batches(batches: list[torch.Tensor], dtype: torch.dtype) -> None:
    for i, b in enumerate(batches):
        bad = ~torch.isfinite(b)
        if bool(bad.any()):
            sample = int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0]) if b.dim() else 0
            raise CalibrationError(
                f"calibration batch {i} has {int(bad.sum())} NaN/Inf value(s) (as {dtype}); the first is in "
                f"sample {sample} of that batch",
                fix="clean or regenerate the inputs"
                + ("; values beyond the range of the model's dtype overflow to Inf" if dtype.itemsize < 4 else ""),
            )


def _record_groups(ctx: Context) -> None:
    deps = ctx.applied_deps or ctx.deps
    if deps is not None:
        ctx.report["groups"] = group_records(deps, ctx.decisions, ctx.folds)
        ctx.report["unknown_ops"] = deps.unknown_ops
    ctx.report["timings"] = ctx.timings


def compress(
    model,
    *,
    input_shape=None,
    calib: Iterable | torch.Tensor,
    recipe: Recipe | None = None,
    data_free: bool = False,
    progress: bool = False,
    **overrides,
) -> Result:
    """Compress ``model`` (an nn.Module or ExportedProgram) and verify the result; see :class:`Recipe` for options.

    ``calib`` yields input batches (or (input, label) pairs; labels are ignored). The last ``calib_held_out``
    batches are not used to fit: they measure the output error.
    """
    recipe = make_recipe(recipe, input_shape=list(input_shape) if input_shape else None, **overrides)
    if not isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        raise RecipeError(
            f"the model must be a torch.nn.Module or a torch.export.ExportedProgram, got {type(model).__name__}"
        )
    dtype = model_dtype(model)
    batches = _as_batches(calib)
    if recipe.input_shape is None:
        recipe.input_shape = [1, *batches[0].shape[1:]]
    shape = tuple(recipe.input_shape)
    for i, b in enumerate(batches):
        if tuple(b.shape[1:]) != shape[1:]:
            raise CalibrationError(
                f"calibration batch {i} has shape {list(b.shape)} but the input shape is {list(shape)}",
                fix="make --input-shape match the calibration data",
            )
    batches = [b.detach().to(dtype) for b in batches]  # a half-precision model gets half-precision inputs
    _check_finite_batches(batches, dtype)
    held = recipe.calib.held_out if len(batches) > recipe.calib.held_out else 0
    fit, held_out = (batches[:-held], batches[-held:]) if held else (batches, [])

    timings: dict[str, float] = {}
    start = time.perf_counter()
    _check_input_shape(model, shape)
    example = example_batch(shape).to(dtype)
    module = _graph_of(model)
    with _quiet_torch():
        _check_runs_eagerly(module, example)
        try:
            gm, _ = trace(module, example)
        except TraceError as e:
            _quote_source_line(e)
            raise
    timings["trace"] = round(time.perf_counter() - start, 4)

    reference = copy.deepcopy(gm)
    ctx = Context(gm=gm, reference=reference, example=example, recipe=recipe, calib=fit, held_out=held_out,
                  data_free=data_free, progress=progress, timings=timings)
    report = ctx.report
    report["recipe"] = dataclasses.asdict(recipe)
    report["data_free"] = data_free
    report["params_before"] = count_params(reference)
    report["macs_before"] = count_macs(reference, example[:1])
    try:
        run_pipeline(ctx, recipe.pipeline)
    except VerificationError as e:
        _record_groups(ctx)
        e.report = report
        raise
    _record_groups(ctx)
    report["params_after"] = count_params(ctx.gm)
    report["macs_after"] = count_macs(ctx.gm, example[:1])
    x = (held_out or [example])[0]
    report["latency_ms"] = {
        "batch": int(x.shape[0]),
        "before": latency_ms(reference, x),
        "after": latency_ms(ctx.gm, x),
    }
    report["solver_fallbacks"] = sum(f.fallback is not None for f in ctx.folds.values())
    report["compensation_refused"] = sum(f.refused for f in ctx.folds.values())
    report["versions"] = versions()
    return Result(ctx.gm, report, reference, example, held_out, recipe)


__all__ = ["Result", "compress", "make_recipe", "summary"]
