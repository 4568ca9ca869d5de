"""The Python API: ``grailc.compress(model, input_shape=..., calib=..., ratio=..., selector=...) -> Result``.

The CLI is a thin shell over this; every recipe field is a keyword argument here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import fx

from grailc import distributed
from grailc.calib_data import check_finite
from grailc.context import Context
from grailc.device import exact_float32, inputs_to, move_graph
from grailc.errors import CalibrationError, GrailcError, RecipeError, VerificationError
from grailc.export import ONNX_UNSUPPORTED, onnx_parity, parity_tolerance, reexport, save_onnx, save_pt2
from grailc.metrics import block_record, count_macs, count_params, latency_ms
from grailc.outputs import StagedOutput, atomic_write_text
from grailc.passes.calibrate import batches_for
from grailc.passmanager import run_pipeline
from grailc.recipe import CalibSpec, ExportSpec, Recipe
from grailc.report import group_records, summary, versions
from grailc.trace import Inputs, capture, check_input_count, input_names, model_dtype, static_batch
from grailc.trace_reuse import Traces


@dataclasses.dataclass
class Result:
    """A compressed model, its report, and what is needed to export it."""

    module: fx.GraphModule
    report: dict
    reference: fx.GraphModule
    example: Inputs  # one tensor per model input
    held_out: list[Inputs]
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
        dtype = next((t.dtype for t in self.example if t.is_floating_point()), self.example[0].dtype)
        skip_onnx = onnx and next((ONNX_UNSUPPORTED[t.dtype] for t in self.example if t.dtype in ONNX_UNSUPPORTED),
                                  None)
        if skip_onnx:
            self.report["onnx"] = {"skipped": skip_onnx}
            onnx = False
        if onnx:
            parity = self.export_onnx(staged.path("model.onnx"))
            parity["path"] = "model.onnx"
            parity["tolerance"] = tol = parity_tolerance(self.recipe.export.parity_tol, dtype)
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
    recipe.validate()
    distributed.check_recipe(recipe)
    return recipe


def _as_batches(calib, names: list[str]) -> list[Inputs]:
    """Calibration batches as tuples with one tensor per model input (``names``). A batch may be a tensor (one
    input), a tuple or list (one tensor per input, in order; for a one-input model ``(input, label, ...)``, whose
    extras are ignored) or a dict keyed by the input names."""
    items = [calib] if isinstance(calib, (torch.Tensor, Mapping)) else list(calib)
    if not items:
        raise CalibrationError("no calibration batches were given")
    return [_as_inputs(item, names, f"calibration batch {i}") for i, item in enumerate(items)]


def _as_inputs(item, names: list[str], what: str) -> Inputs:
    listed = f"{len(names)} input(s) ({', '.join(names)})"
    if isinstance(item, Mapping):
        if sorted(map(str, item)) != sorted(names):
            raise CalibrationError(f"{what} has keys ({', '.join(map(str, item))}) but the model's inputs are "
                                   f"({', '.join(names)})", fix="key each batch by the model's input names")
        item = tuple(item[n] for n in names)
    elif isinstance(item, torch.Tensor):
        item = (item,)
    elif isinstance(item, (tuple, list)):
        item = tuple(item[:1]) if len(names) == 1 else tuple(item)  # one input: (input, label), label ignored
    if not isinstance(item, tuple) or len(item) != len(names):
        held = f"{len(item)} tensor(s)" if isinstance(item, tuple) else f"a {type(item).__name__}"
        raise CalibrationError(f"{what} holds {held} but the model takes {listed}",
                               fix="give each batch as a tuple with one tensor per model input, in order")
    for name, t in zip(names, item):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            got = "a tensor without a batch dimension" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise CalibrationError(f"{what}: input {name} is {got}", fix="give a tensor, batch dimension first")
    if len({t.shape[0] for t in item}) > 1:
        sizes = ", ".join(f"{n} {t.shape[0]}" for n, t in zip(names, item))
        raise CalibrationError(f"{what}: the inputs have different batch sizes ({sizes})",
                               fix="give every input of a batch the same number of samples")
    return item


def _input_shapes(input_shape, first: Inputs) -> list[tuple[int, ...]]:
    """One shape per input: the recipe's (one shape, or a list of shapes), else the first batch's."""
    if input_shape is None:
        return [(1, *t.shape[1:]) for t in first]
    if all(isinstance(d, int) for d in input_shape):
        return [tuple(input_shape)]
    return [tuple(s) for s in input_shape]


def _check_finite_batches(batches: list[Inputs], names: list[str], dtype: torch.dtype) -> None:
    fix = "clean or regenerate the inputs" + (
        "; values beyond the range of the model's dtype overflow to Inf" if dtype.itemsize < 4 else "")
    for i, batch in enumerate(batches):
        for name, t in zip(names, batch):
            which = f", input {name}" if len(names) > 1 else ""
            check_finite(t, f"calibration batch {i}{which} (as {t.dtype})", fix=fix)


def _record_groups(ctx: Context) -> None:
    deps = ctx.applied_deps or ctx.deps
    if deps is not None:
        ctx.report["groups"] = group_records(deps, ctx.decisions, ctx.folds, ctx.rows)
        ctx.report["unknown_ops"] = deps.unknown_ops
    ctx.report["timings"] = ctx.timings


def _cast(batches: list[tuple[torch.Tensor, ...]], dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """A half-precision model gets half-precision inputs; integer inputs (token ids, masks) stay as they are."""
    return [tuple(t.detach().to(dtype) if t.is_floating_point() else t.detach() for t in b) for b in batches]


def compress(
    model,
    *,
    input_shape=None,
    calib: Iterable | torch.Tensor,
    recipe: Recipe | None = None,
    data_free: bool = False,
    progress: bool = False,
    measure_latency: bool = True,
    sharded: bool = False,
    traces: Traces | None = None,
    dense_calib: Iterable | None = None,
    device: torch.device | str | None = None,
    **overrides,
) -> Result:
    """Compress ``model`` (an nn.Module or ExportedProgram) and verify the result; see :class:`Recipe` for options.

    ``calib`` yields input batches: a tensor per batch for a one-input model (or (input, label) pairs; labels are
    ignored), a tuple of tensors (one per input, in order) or a dict keyed by the input names for a model with
    several. ``input_shape`` is one shape, or a list with one per input. The last ``calib_held_out`` batches are
    not used to fit: they measure the output error. ``measure_latency=False`` skips the PyTorch latency figures
    (a layer-by-layer caller times the whole model instead).

    Under ``torchrun`` (see :mod:`grailc.distributed`) every process passes the same ``calib``, and the batches
    fitted are shared among the processes (batch i to rank i % W), the held-out ones kept whole on each;
    ``sharded=True`` says that ``calib`` already is this process's share (the layer-by-layer LLM driver shards its
    token windows itself). ``traces`` (:class:`grailc.trace.Traces`): graphs traced before, reused for a model built
    like one of them instead of tracing it again (the layer-by-layer driver passes one for all its decoder layers).
    ``dense_calib``: batches parallel to ``calib`` that sequential calibration feeds the dense run instead (the
    layer-by-layer driver passes the dense model's own stream with ``compensate_target="stream"``).
    ``device``: where the passes compute (a GPU: ``"cuda"``); the model is traced on the CPU, its graph moved there
    for calibration, selection, compensation, rewriting and the self-check (float32 without TF32), and the result
    comes back to the CPU, where the metrics, the export and the ONNX check run. None: where the model is.
    """
    if input_shape:  # the recipe holds one shape, or a list of shapes for a model with several inputs
        shapes = [list(s) for s in input_shape] if isinstance(input_shape[0], (tuple, list)) else [list(input_shape)]
        input_shape = shapes[0] if len(shapes) == 1 else shapes
    recipe = make_recipe(recipe, input_shape=input_shape or None, **overrides).resolved()
    if not isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        raise RecipeError(
            f"the model must be a torch.nn.Module or a torch.export.ExportedProgram, got {type(model).__name__}"
        )
    dtype = model_dtype(model)
    names = input_names(model)
    batches = _as_batches(calib, names)
    shapes = _input_shapes(recipe.input_shape, batches[0])
    check_input_count(names, shapes)
    if recipe.input_shape is None:
        recipe.input_shape = list(shapes[0]) if len(shapes) == 1 else [list(s) for s in shapes]
    for i, batch in enumerate(batches):
        for name, t, shape in zip(names, batch, shapes):
            if tuple(t.shape[1:]) != shape[1:]:
                which = f" input {name}" if len(names) > 1 else ""
                raise CalibrationError(
                    f"calibration batch {i}{which} has shape {list(t.shape)} but the input shape is {list(shape)}",
                    fix="make --input-shape match the calibration data",
                )
    batches = _cast(batches, dtype)
    _check_finite_batches(batches, names, dtype)
    held = recipe.calib.held_out if len(batches) > recipe.calib.held_out else 0
    fit, held_out = (batches[:-held], batches[-held:]) if held else (batches, [])
    dense_fit = None
    if dense_calib is not None:
        dense = _cast(_as_batches(dense_calib, names), dtype)
        if [[t.shape for t in b] for b in dense] != [[t.shape for t in b] for b in batches]:
            raise CalibrationError("dense_calib must hold one batch of the same shapes per calibration batch",
                                   fix="pass the dense run's inputs batch for batch")
        dense_fit = dense[:-held] if held else dense

    timings: dict[str, float] = {}
    start = time.perf_counter()
    gm, example = capture(model, shapes, data=batches[0], traces=traces)
    timings["trace"] = round(time.perf_counter() - start, 4)
    if static_batch(gm) is not None:  # a graph fixed to one batch size is fed batches of that size
        fit = batches_for(gm, fit)
        held_out = batches_for(gm, held_out) if held_out else []
        dense_fit = batches_for(gm, dense_fit) if dense_fit is not None else None
    if not sharded:
        fit = distributed.shard(fit)
        dense_fit = distributed.shard(dense_fit) if dense_fit is not None else None

    reference = copy.deepcopy(gm)
    params_before, macs_before = count_params(reference), count_macs(reference, example)
    home = example[0].device
    device = torch.device(device) if device is not None else home
    if device != home:  # the passes compute on the device; the result comes back (below)
        gm, reference = move_graph(gm, device), move_graph(reference, device)
        example, fit, held_out = inputs_to([example], device)[0], inputs_to(fit, device), inputs_to(held_out, device)
        dense_fit = inputs_to(dense_fit, device) if dense_fit is not None else None
    ctx = Context(gm=gm, reference=reference, example=example, recipe=recipe, calib=fit, held_out=held_out,
                  dense_calib=dense_fit, data_free=data_free, progress=progress, timings=timings)
    report = ctx.report
    report["recipe"] = dataclasses.asdict(recipe)
    report["data_free"] = data_free
    report["params_before"] = params_before
    report["macs_before"] = macs_before
    report["device"] = str(device)
    if distributed.active():
        report["distributed"] = {"processes": distributed.world(), "backend": distributed.backend(),
                                 "batches_here": len(fit), "sharding": "fitted batch i on rank i % processes"}
    try:
        with exact_float32(device):
            run_pipeline(ctx, recipe.pipeline)
        distributed.agree(ctx.gm)  # every process holds bitwise the same result, or none is written
    except VerificationError as e:
        _record_groups(ctx)
        e.report = report
        raise
    _record_groups(ctx)
    if device != home:
        ctx.gm, reference = move_graph(ctx.gm, home), move_graph(reference, home)
        example, held_out = inputs_to([example], home)[0], inputs_to(held_out, home)
    report["params_after"] = count_params(ctx.gm)
    report["macs_after"] = count_macs(ctx.gm, example)
    report["cpu_block"] = block_record(reference, ctx.gm)
    x = (held_out or [example])[0]
    if measure_latency:
        report["latency_ms"] = {
            "batch": int(x[0].shape[0]),
            "before": latency_ms(reference, x),
            "after": latency_ms(ctx.gm, x),
        }
    report["solver_fallbacks"] = sum(f.fallback is not None for f in ctx.folds.values())
    report["compensation_refused"] = sum(f.refused for f in ctx.folds.values())
    report["versions"] = versions()
    return Result(ctx.gm, report, reference, example, held_out, recipe)


__all__ = ["Result", "compress", "make_recipe", "summary"]
