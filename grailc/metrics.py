"""Model figures for the report: parameters, multiply-accumulates, outputs and their errors, latency."""

from __future__ import annotations

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from grailc.surgery import get_param

aten = torch.ops.aten
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
CPU_BLOCK = 16  # channels: ONNX Runtime's CPU blocked layout (NCHWc) on AVX-512, a multiple of AVX2's 8


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _MacCounter(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.macs = 0

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and isinstance(out, torch.Tensor):
            if n.target in CONVS:
                w = self.env[n.args[1]]
                self.macs += out.numel() * w[0].numel()
            elif n.target == aten.linear.default:
                self.macs += out.numel() * self.env[n.args[1]].shape[1]
            elif n.target in (aten.matmul.default, aten.bmm.default, aten.mm.default):
                self.macs += out.numel() * self.env[n.args[0]].shape[-1]
        return out


def count_macs(gm: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of conv/linear/matmul per sample of ``example`` (one tensor per input)."""
    counter = _MacCounter(gm)
    with torch.no_grad():
        counter.run(*example)
    return counter.macs // max(1, example[0].shape[0])


def conv_widths(gm: fx.GraphModule) -> list[int]:
    """The output channels of every convolution of ``gm`` whose weight is one of its parameters or buffers."""
    widths = []
    for n in gm.graph.nodes:
        w = n.args[1] if n.op == "call_function" and n.target in CONVS else None
        if isinstance(w, fx.Node) and w.op == "get_attr":
            widths.append(int(get_param(gm, w.target).shape[0]))
    return widths


def block_record(before: fx.GraphModule, after: fx.GraphModule) -> dict:
    """Convolutions whose output channels are not a multiple of ``CPU_BLOCK``, before and after compression:
    ONNX Runtime's CPU runs those outside its blocked layout, and one narrowed off the block can run slower than
    the dense one it replaced."""
    dense, small = conv_widths(before), conv_widths(after)
    return {"block": CPU_BLOCK, "convs": len(small),
            "not_multiple_before": sum(w % CPU_BLOCK != 0 for w in dense),
            "not_multiple_after": sum(w % CPU_BLOCK != 0 for w in small)}


def flat_output(out) -> torch.Tensor:
    """All floating outputs of a model as one float64 vector per sample."""
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.cat([t.detach().reshape(t.shape[0] if t.dim() else 1, -1).to(torch.float64) for t in leaves], 1)


def output_error(reference, compressed, batches: list[tuple[torch.Tensor, ...]]) -> dict:
    """||y - y_ref|| / ||y_ref|| over the batches, and top-1 agreement when the output is one logits matrix."""
    num = den = 0.0
    agree = total = 0
    single_matrix = True
    with torch.no_grad():
        for x in batches:
            y_ref, y = reference(*x), compressed(*x)
            a, b = flat_output(y_ref), flat_output(y)
            num += float(((b - a) ** 2).sum())
            den += float((a**2).sum())
            leaves = [t for t in tree_leaves(y_ref) if isinstance(t, torch.Tensor)]
            if len(leaves) == 1 and leaves[0].dim() == 2 and leaves[0].shape[1] > 1:
                agree += int((a.argmax(1) == b.argmax(1)).sum())
                total += a.shape[0]
            else:
                single_matrix = False
    rel = (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))
    result = {"relative_l2": rel, "samples": sum(int(x[0].shape[0]) for x in batches)}
    if single_matrix and total:
        result["top1_agreement"] = agree / total
    return result


def latency_ms(fn, args: tuple, repeats: int = 5) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds after one warm-up call (autograd off); the timing loop is
    :func:`grailc.bench.interleaved_ms`."""
    from grailc.bench import interleaved_ms

    with torch.no_grad():
        times = interleaved_ms([lambda: fn(*args)], repeats, warmup=1)[0]
    return sorted(times)[len(times) // 2]
