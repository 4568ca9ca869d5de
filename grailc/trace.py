"""Tracing: capture any model as one ATen-level FX graph with ``torch.export``.

``torch.export.export(model, args, strict=False)`` gives an ``ExportedProgram``; ``ep.module()`` is an ordinary
``fx.GraphModule`` whose nodes carry shapes (``node.meta["val"]``) and whose parameters are ``get_attr`` nodes
named after the original modules. The batch axis is exported dynamic when the model allows it (so calibration can
use any batch size and the ONNX model takes any batch), static otherwise.
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


def example_batch(input_shape: tuple[int, ...], batch: int | None = None) -> torch.Tensor:
    """A deterministic example input; batch at least 2 by default so that the batch axis can be exported dynamic."""
    shape = (max(2, input_shape[0]) if batch is None else batch, *input_shape[1:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def export(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Export with a dynamic batch axis, falling back to a static one; errors name the failing construct."""
    if not isinstance(model, fx.GraphModule):  # an exported graph is already in inference form
        model = model.eval()
    try:
        return torch.export.export(
            model, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=MAX_BATCH)},), strict=False
        )
    except Exception:  # the model pins its batch size (e.g. view(1, -1)): trace it static below
        pass
    try:
        return torch.export.export(model, (example,), strict=False)
    except Exception as e:  # any tracing failure becomes one clear line
        raise TraceError(
            f"the model could not be traced: {type(e).__name__}: {_first_line(e)}",
            where=_where(e),
            fix="make the failing construct traceable (no data-dependent Python control flow on tensor values, "
            "no untraceable calls), or export the model yourself with torch.export and pass the .pt2 file",
        ) from e


def trace(module: torch.nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule, torch.export.ExportedProgram]:
    """The graph grailc works on."""
    ep = export(module, example)
    gm = ep.module()
    _check_runs(gm, example)
    return gm, ep


def capture(model, shape: tuple[int, ...], example: torch.Tensor | None = None) -> tuple[fx.GraphModule, torch.Tensor]:
    """Trace an nn.Module or ExportedProgram for inputs of ``shape``: the graph and its example input. Integer
    inputs (token ids) cannot be made up: their ``example`` comes from the calibration data."""
    _check_input_shape(model, shape)
    _check_single_input(model)
    module = _graph_of(model)
    with _quiet_torch():
        if example is None:
            example = _runnable_example(module, shape, model_dtype(model))
        try:
            gm, _ = trace(module, example)
        except TraceError as e:
            _quote_source_line(e)
            raise
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


def _check_runs(gm: fx.GraphModule, example: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            gm(example)
    except Exception as e:  # the traced graph must run on its own example
        raise TraceError(
            f"the traced graph does not run on the example input {list(example.shape)}: {_first_line(e)}",
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


def program_input(program: torch.export.ExportedProgram) -> torch.Tensor | None:
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
        val = program_input(model)
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
    val = program_input(model)
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


def _check_single_input(model) -> None:
    """grailc compresses models with one input tensor (float data, or integer ids into an embedding); say so
    plainly for a model that takes several, rather than blaming the input shape."""
    import inspect

    if isinstance(model, torch.export.ExportedProgram):
        names = [s.arg.name for s in model.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    elif isinstance(model, fx.GraphModule):
        names = [n.name for n in model.graph.nodes if n.op == "placeholder"]
    else:
        try:
            params = inspect.signature(model.forward).parameters.values()
        except (TypeError, ValueError):
            return
        names = [p.name for p in params if p.default is inspect.Parameter.empty
                 and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) > 1:
        raise RecipeError(
            f"the model takes {len(names)} inputs ({', '.join(names)}); grailc compresses models with one input "
            "tensor (float data, or integer token ids) for now",
            fix="wrap the model in a module whose forward takes one tensor and builds the others (masks, "
            "position ids) inside, or give the other inputs default values",
        )


def _graph_of(model):
    """An nn.Module to trace; an ExportedProgram's guards (which pin the batch it was saved with) are left out."""
    if isinstance(model, torch.export.ExportedProgram):
        module = model.module(check_guards=False)
        module.validate_inputs = False  # its input check would also pin the saved batch size
        return module
    return model.eval() if not isinstance(model, fx.GraphModule) else model


def _runnable_example(module, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Run the model once before tracing, so that a wrong input shape is not reported as a tracing failure.

    A batch of at least 2 comes first (it lets the batch axis be exported dynamic); a model that only runs on the
    batch it was written for (say ``x.view(1, -1)``) gets exactly ``shape``.
    """
    example = example_batch(shape).to(dtype)
    try:
        with torch.no_grad():
            module(example)
        return example
    except Exception as e:  # any failure on the plain model is about its input
        if example.shape[0] != shape[0]:
            try:
                exact = example_batch(shape, batch=shape[0]).to(dtype)
                with torch.no_grad():
                    module(exact)
                return exact
            except Exception:  # report the first failure, on the usual example
                pass
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
