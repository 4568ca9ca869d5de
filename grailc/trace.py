"""Tracing: capture any model as one ATen-level FX graph with ``torch.export``.

``torch.export.export(model, args, strict=False)`` gives an ``ExportedProgram``; ``ep.module()`` is an ordinary
``fx.GraphModule`` whose nodes carry shapes (``node.meta["val"]``) and whose parameters are ``get_attr`` nodes
named after the original modules. The batch axis is exported dynamic when the model allows it (so calibration can
use any batch size and the ONNX model takes any batch), static otherwise.

A model's inputs are always a tuple of tensors (one per positional input, batch dimension first, the same batch
size for all); a model with one input gets a 1-tuple.

``traces`` (:class:`grailc.trace_reuse.Traces`) keeps the graphs traced for one caller (the layer-by-layer LLM
driver): a module built like one traced before gets a copy of that graph with its own tensors bound in instead of
a new ``torch.export``.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import logging
import re

import torch
from torch import fx
from torch.export import Dim

from grailc.errors import RecipeError, TraceError

MAX_BATCH = 1 << 16

Inputs = tuple[torch.Tensor, ...]


def example_inputs(shapes: list[tuple[int, ...]], dtype: torch.dtype, data: Inputs | None = None,
                   batch: int | None = None, device: torch.device | str = "cpu") -> Inputs:
    """Deterministic example inputs: seeded Gaussian ones for floating inputs (drawn on the CPU, then moved to
    ``device``, so every device gets the same values), the first rows of ``data`` for integer ones (token ids and
    masks cannot be made up). The batch is at least 2 by default, so that the batch axis can be exported dynamic."""
    batch = max(2, shapes[0][0]) if batch is None else batch
    data = data if data is not None else (None,) * len(shapes)
    if any(d is not None and not d.is_floating_point() for d in data):
        batch = min(batch, data[0].shape[0])
    generator = torch.Generator().manual_seed(0)
    return tuple(
        d[:batch] if d is not None and not d.is_floating_point()
        else torch.randn((batch, *shape[1:]), generator=generator).to(device, dtype)
        for shape, d in zip(shapes, data)
    )


def export(model: torch.nn.Module, example: Inputs) -> torch.export.ExportedProgram:
    """Export with a dynamic batch axis (one for all inputs), falling back to a static one; errors name the failing
    construct."""
    if not isinstance(model, fx.GraphModule):  # an exported graph is already in inference form
        model = model.eval()
    batch = Dim("batch", min=1, max=MAX_BATCH)
    try:
        return torch.export.export(model, example, dynamic_shapes=tuple({0: batch} for _ in example), strict=False)
    except Exception:  # the model pins its batch size (e.g. view(1, -1)): trace it static below
        pass
    try:
        return torch.export.export(model, example, strict=False)
    except Exception as e:  # any tracing failure becomes one clear line
        raise TraceError(
            f"the model could not be traced: {type(e).__name__}: {_first_line(e)}",
            where=_where(e),
            fix="make the failing construct traceable (no data-dependent Python control flow on tensor values, "
            "no untraceable calls), or export the model yourself with torch.export and pass the .pt2 file",
        ) from e


def trace(module: torch.nn.Module, example: Inputs) -> tuple[fx.GraphModule, torch.export.ExportedProgram]:
    """The graph grailc works on."""
    ep = export(module, example)
    gm = ep.module()
    _check_runs(gm, example)
    return gm, ep


def capture(model, shapes: list[tuple[int, ...]], data: Inputs | None = None,
            traces=None) -> tuple[fx.GraphModule, Inputs]:
    """Trace an nn.Module or ExportedProgram for inputs of ``shapes`` (one per input): the graph and its example
    inputs. Integer inputs (token ids, masks) cannot be made up: theirs come from ``data``, a calibration batch.
    ``traces``: graphs traced before, one of which is reused when it fits (:class:`grailc.trace_reuse.Traces`); a
    new trace joins them."""
    check_input_count(input_names(model), shapes)
    _check_input_shapes(model, shapes)
    module = _graph_of(model)
    with _quiet_torch():
        example, output = _runnable_example(module, shapes, model_dtype(model), data)
        gm = traces.reuse(module, shapes, example, output) if traces is not None else None
        if gm is not None:
            return gm, example
        try:
            gm, _ = trace(module, example)
        except TraceError as e:
            _quote_source_line(e)
            raise
        if traces is not None:
            traces.remember(gm, module, shapes, example)
    return gm, example


def static_batch(gm: fx.GraphModule) -> int | None:
    """The batch size the graph is fixed to, or None when its batch axis is dynamic."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() > 0 and isinstance(val.shape[0], int):
                return int(val.shape[0])
            return None
    return None


def _check_runs(gm: fx.GraphModule, example: Inputs) -> None:
    try:
        with torch.no_grad():
            gm(*example)
    except Exception as e:  # the traced graph must run on its own example
        raise TraceError(
            f"the traced graph does not run on the example inputs {_describe(example)}: {_first_line(e)}",
            fix="check --input-shape",
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _where(e: BaseException) -> str | None:
    """The user's source line that failed, from the traceback (the last frame outside torch)."""
    tb, found = e.__traceback__, None
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not re.search(r"(site-packages|dist-packages)/(torch|grailc)/|/grailc/", name):
            found = f"{name}:{tb.tb_lineno} in {tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    return found


def program_inputs(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor | None]:
    """The (fake) tensors a program's user inputs were exported with, by name (None for a non-tensor input)."""
    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    return {name: vals.get(name) if isinstance(vals.get(name), torch.Tensor) else None for name in names}


def input_names(model) -> list[str]:
    """The model's inputs: an exported program's user inputs, a graph's placeholders, or the positional parameters
    of ``forward`` without a default (the first one when all have defaults, or ``x`` when there is no signature)."""
    import inspect

    if isinstance(model, torch.export.ExportedProgram):
        return list(program_inputs(model))
    if isinstance(model, fx.GraphModule):
        return [n.name for n in model.graph.nodes if n.op == "placeholder"]
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return ["x"]
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    return required or [p.name for p in params[:1]] or ["x"]


def model_dtype(model) -> torch.dtype:
    """The floating type the model computes in: its first float input's (ExportedProgram) or its first float
    parameter's."""
    if isinstance(model, torch.export.ExportedProgram):
        floats = [v for v in program_inputs(model).values() if v is not None and v.is_floating_point()]
        if floats:
            return floats[0].dtype
        tensors = model.state_dict.values()
    else:
        tensors = [*model.parameters(), *model.buffers()]
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def check_input_count(names: list[str], shapes: list[tuple[int, ...]]) -> None:
    """One input shape per model input."""
    if len(shapes) != len(names):
        raise RecipeError(
            f"{len(shapes)} input shape(s) given, but the model takes {len(names)} input(s) ({', '.join(names)})",
            fix="give one input shape per model input, in order (--input-shape repeated, or input_shape=[[...], ...])",
        )


def _check_input_shapes(model, shapes: list[tuple[int, ...]]) -> None:
    """An input shape that does not fit an exported program is a bad flag, not a tracing failure."""
    if not isinstance(model, torch.export.ExportedProgram):
        return
    for (name, val), shape in zip(program_inputs(model).items(), shapes):
        if val is None:
            continue
        spec = [d if isinstance(d, int) else None for d in val.shape]
        fits = len(spec) == len(shape) and all(s is None or s == d for s, d in zip(spec[1:], shape[1:]))
        if not fits:
            expected = "[" + ", ".join(["N", *("?" if s is None else str(s) for s in spec[1:])]) + "]"
            which = f"input {name}" if len(shapes) > 1 else "model"
            raise RecipeError(
                f"input shape {list(shape)} does not fit the {which}, which was exported for {expected}",
                fix="give --input-shape (or input_shape=) in the model's layout, batch dimension first",
            )


def _graph_of(model):
    """An nn.Module to trace; an ExportedProgram's guards (which pin the batch it was saved with) are left out."""
    if isinstance(model, torch.export.ExportedProgram):
        module = model.module(check_guards=False)
        module.validate_inputs = False  # its input check would also pin the saved batch size
        return module
    return model.eval() if not isinstance(model, fx.GraphModule) else model


def _runnable_example(module, shapes: list[tuple[int, ...]], dtype: torch.dtype,
                      data: Inputs | None) -> tuple[Inputs, object]:
    """Run the model once before tracing, so that a wrong input shape is not reported as a tracing failure: the
    example inputs and the model's output on them.

    A batch of at least 2 comes first (it lets the batch axis be exported dynamic); a model that only runs on the
    batch it was written for (say ``x.view(1, -1)``) gets exactly ``shapes[0][0]``.
    """
    device = _device_of(module, data)
    example = example_inputs(shapes, dtype, data, device=device)
    try:
        with torch.no_grad():
            return example, module(*example)
    except Exception as e:  # any failure on the plain model is about its input
        if example[0].shape[0] != shapes[0][0]:
            try:
                exact = example_inputs(shapes, dtype, data, batch=shapes[0][0], device=device)
                with torch.no_grad():
                    return exact, module(*exact)
            except Exception:  # report the first failure, on the usual example
                pass
        text = str(e).strip().splitlines()
        what = "an input" if len(example) == 1 else "inputs"
        raise RecipeError(
            f"the model does not run on {what} of shape {_describe(example)}: "
            f"{type(e).__name__}: {text[0][:300] if text else ''}",
            fix="check --input-shape (or input_shape=): one per model input, in order, batch dimension first",
        ) from e


def _device_of(module, data: Inputs | None) -> torch.device:
    """Where the example inputs go: the calibration data's device, else the model's (its first parameter's)."""
    if data is not None and data and isinstance(data[0], torch.Tensor):
        return data[0].device
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _describe(inputs: Inputs) -> str:
    """'[2, 3, 8, 8] (torch.float32)', or one such entry per input, comma-separated."""
    return ", ".join(f"{list(t.shape)} ({t.dtype})" for t in inputs)


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
