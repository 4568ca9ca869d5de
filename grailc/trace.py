"""Tracing: capture any model as one ATen-level FX graph with ``torch.export``.

``torch.export.export(model, args, strict=False)`` gives an ``ExportedProgram``; ``ep.module()`` is an ordinary
``fx.GraphModule`` whose nodes carry shapes (``node.meta["val"]``) and whose parameters are ``get_attr`` nodes
named after the original modules. The batch axis is exported dynamic when the model allows it (so calibration can
use any batch size and the ONNX model takes any batch), static otherwise.
"""

from __future__ import annotations

import re

import torch
from torch import fx
from torch.export import Dim

from grailc.errors import TraceError

MAX_BATCH = 1 << 16


def example_batch(input_shape: tuple[int, ...]) -> torch.Tensor:
    """A deterministic example input; batch at least 2 so that the batch axis can be exported dynamic."""
    shape = (max(2, input_shape[0]), *input_shape[1:])
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


def trace(model_or_program, example: torch.Tensor) -> tuple[fx.GraphModule, torch.export.ExportedProgram]:
    """The graph grailc works on, from an nn.Module or an ExportedProgram."""
    if isinstance(model_or_program, torch.export.ExportedProgram):
        ep = model_or_program
        try:
            ep = torch.export.export(ep.module(), (example,), dynamic_shapes=_batch_dynamic(ep), strict=False)
        except Exception:  # keep the program as it was saved
            pass
    else:
        ep = export(model_or_program, example)
    gm = ep.module()
    _check_runs(gm, example)
    return gm, ep


def _batch_dynamic(ep):
    return ({0: Dim("batch", min=1, max=MAX_BATCH)},)


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
