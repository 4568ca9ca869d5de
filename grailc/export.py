"""Export: the compressed graph as a reloadable ``torch.export`` program (.pt2) and an ONNX model, with an ONNX
Runtime parity check (CUDA provider when a GPU is present, CPU otherwise).

The ONNX graph is written at opset ``ONNX_OPSET`` and optimised by the exporter's own pass (onnxscript's optimizer:
constant folding, BatchNorm folded into the preceding Conv/Gemm, no-op Identity/Slice/Reshape/Expand removed,
unused nodes and initialisers dropped). The parity check runs on that final file.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch
from torch import fx

from grailc.errors import GrailcError
from grailc.metrics import flat_output, latency_ms
from grailc.trace import export


def reexport(gm: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """A fresh ExportedProgram of the rewritten graph (shapes re-derived from the new weights)."""
    return export(gm, example)


def save_pt2(ep: torch.export.ExportedProgram, path: Path) -> None:
    torch.export.save(ep, str(path))


def ort_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if torch.cuda.is_available() and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# opset 21, not the newest (23): ONNX Runtime 1.31's CUDA provider has no MaxPool-22 kernel, so at 23 a ResNet's
# max-pool ran on the CPU between two device copies (on an H100, dense ResNet-18 took 22 to 31 ms a batch of 64 at
# 23, 11.4 ms a batch of 256 at 21). On the CPU provider 21 and 23 ran equally fast (ResNet-50, MobileNetV3). sdpa
# is exported as matmuls and softmax.
ONNX_OPSET = 21


def save_onnx(ep: torch.export.ExportedProgram, example: tuple[torch.Tensor, ...], path: Path,
              external_data: bool = False, fix: str = "use the .pt2 output, or --no-onnx",
              opset: int = ONNX_OPSET) -> None:
    """Write ONNX quietly at ``opset``, optimised; ``external_data`` puts the weights in a file beside it (needed
    above 2 GB)."""
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            torch.onnx.export(ep, example, str(path), dynamo=True, verbose=False, external_data=external_data,
                              opset_version=opset, optimize=True)
    except Exception as e:  # the exporter's own message, shortened
        raise GrailcError(
            f"ONNX export failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}", fix=fix,
        ) from e


def onnx_parity(path: Path, module, batches: list[tuple[torch.Tensor, ...]], repeats: int = 5) -> dict:
    """max |ORT - PyTorch| over the batches (one tensor per input each), relative to max |PyTorch|, and ORT latency
    on the first batch."""
    import onnxruntime as ort

    providers = ort_providers()
    session = ort.InferenceSession(str(path), providers=providers)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(batches[0]):
        raise GrailcError(f"the ONNX model takes {len(names)} input(s) ({', '.join(names)}) but the model takes "
                          f"{len(batches[0])}", fix="use the .pt2 output, or --no-onnx")
    max_diff = max_ref = 0.0
    with torch.no_grad():
        for x in batches:
            ref = flat_output(module(*x)).numpy()
            outs = session.run(None, {name: t.numpy() for name, t in zip(names, x)})
            got = np.concatenate([o.reshape(o.shape[0] if o.ndim else 1, -1) for o in outs], 1)
            max_diff = max(max_diff, float(np.abs(got - ref).max()))
            max_ref = max(max_ref, float(np.abs(ref).max()))
    feed = {name: t.numpy() for name, t in zip(names, batches[0])}
    latency = latency_ms(session.run, (None, feed), repeats)
    return {
        **graph_facts(path),
        "max_abs_diff": max_diff,
        "relative_diff": max_diff / max_ref if max_ref > 0 else max_diff,
        "provider": session.get_providers()[0],
        "latency_ms": latency,
        "latency_batch": int(batches[0][0].shape[0]),
    }


def graph_facts(path: Path) -> dict:
    """The opset and the count of every node type of the ONNX graph at ``path`` (weights not loaded)."""
    import collections

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    nodes = collections.Counter(n.op_type for n in model.graph.node)
    return {"opset": opset, "nodes": dict(sorted(nodes.items()))}


ONNX_UNSUPPORTED = {
    torch.bfloat16: "bfloat16 models are not exported to ONNX (ONNX Runtime's CPU provider and numpy have no "
    "bfloat16); use model.pt2, or compress a float32 copy for ONNX",
}
PARITY_ULPS = 8  # ONNX Runtime and PyTorch may sum in another order: allow this many ulps of the model's dtype


def parity_tolerance(tol: float, dtype: torch.dtype) -> float:
    """The recipe's ONNX parity tolerance, widened to what the model's float type can resolve."""
    return max(tol, PARITY_ULPS * torch.finfo(dtype).eps) if dtype.is_floating_point else tol
