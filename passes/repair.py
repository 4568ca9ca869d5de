"""Repair: re-estimate the statistics of every BatchNorm of the compressed graph on the calibration batches
(label-free, no backprop). Pruning and compensation shift the distribution each BatchNorm normalises; in eval mode
it still uses the dense model's running statistics. Each BatchNorm, in graph order (so that it sees the already
repaired upstream), gets

    running_mean = mean(x),    running_var = mean((x - running_mean)^2)

per channel over every calibration position (N*H*W), accumulated in float64. Cost: one forward pass over the
calibration batches up to the last BatchNorm, which advance through the graph together (each batch is run up to a
BatchNorm, its statistics are set from every batch, then all go on: ``calibrate.Resumable``); memory: the live
activations of all batches at once, as for one forward pass of their total size. In a data-parallel run
(``torchrun``) each process holds its share of the batches, and the sums behind the moments (sum x, sum x^2, the
count) are summed over the processes before each BatchNorm is set, so every process sets the same statistics.
The report says how far the statistics moved, or that there was nothing to repair.
"""

from __future__ import annotations

import torch
from grailc.passes.calibrate import GraphOrder, Resumable, batches_for
from torch import fx

from grailc.distributed import all_reduce_stats
from grailc.passmanager import Pass, register_pass
from grailc.surgery import get_param, set_param

aten = torch.ops.aten
# overload -> (index of the training flag or None, index of eps); args are (x, weight, bias, mean, var, ...)
BATCH_NORMS = {aten._native_batch_norm_legit_no_training.default: (None, 6), aten.batch_norm.default: (5, 7)}


def batch_norms(gm: fx.GraphModule) -> list[fx.Node]:
    """The eval-mode BatchNorm nodes whose running statistics are buffers, in graph order."""
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in BATCH_NORMS:
            continue
        flag = BATCH_NORMS[n.target][0]
        stats = n.args[3:5]
        if (flag is None or not n.args[flag]) and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in stats):
            found.append(n)
    return found


def moments(inputs: list[torch.Tensor]):
    """Per-channel (dim 1) mean and variance over every batch and position (float64), and over the batches of
    every process of a data-parallel run."""
    total, squares, count = 0.0, 0.0, 0
    for x in inputs:
        a = x.detach().movedim(1, -1).reshape(-1, x.shape[1]).to(torch.float64)
        total, squares, count = total + a.sum(0), squares + (a * a).sum(0), count + a.shape[0]
    summed = all_reduce_stats({"total": total, "squares": squares, "count": count})
    total, squares, count = summed["total"], summed["squares"], summed["count"]
    mean = total / count
    return mean, (squares / count - mean * mean).clamp_min(0)


def repair_batch_norms(gm: fx.GraphModule, batches: list) -> dict:
    """Re-estimate every BatchNorm in graph order, in one pass; what changed, for the report."""
    norms = batch_norms(gm)
    if not norms:
        return {"batch_norms": 0, "note": "nothing to repair: the graph has no BatchNorm with running statistics"}
    order = GraphOrder(gm)
    runs = [Resumable(order, batch if isinstance(batch, tuple) else (batch,)) for batch in batches]
    mean_moves, std_ratios = [], []
    for n in norms:  # graph order: each sees the repaired upstream
        for run in runs:  # every batch up to this BatchNorm
            run.run_until(n, before=True)
        mean_node, var_node, eps = n.args[3], n.args[4], float(n.args[BATCH_NORMS[n.target][1]])
        old_mean, old_var = get_param(gm, mean_node.target), get_param(gm, var_node.target)
        mean, var = moments([run.runner.env[n.args[0]] for run in runs])
        old_std = (old_var.to(torch.float64) + eps).sqrt()
        mean_moves.append(float(((mean - old_mean.to(torch.float64)).abs() / old_std).mean()))
        std_ratios.append(float(((var + eps).sqrt() / old_std).mean()))
        set_param(gm, mean_node.target, mean.to(old_mean.dtype))
        set_param(gm, var_node.target, var.to(old_var.dtype))
        for run in runs:  # the statistics were fetched before this node: hand it the new ones
            run.runner.env[mean_node] = get_param(gm, mean_node.target)
            run.runner.env[var_node] = get_param(gm, var_node.target)
    return {
        "batch_norms": len(norms),
        "batches": all_reduce_stats({"batches": len(batches)})["batches"],
        # averages over BatchNorms of the per-channel means: |new mean - old mean| / old std, new std / old std
        "mean_shift_in_std": sum(mean_moves) / len(norms),
        "std_ratio": sum(std_ratios) / len(norms),
    }


@register_pass
class Repair(Pass):
    """Re-estimate BatchNorm statistics of the compressed graph (parameters change, the graph does not)."""

    name = "repair"

    def run(self, ctx) -> None:
        ctx.report["repair"] = repair_batch_norms(ctx.gm, batches_for(ctx.gm, ctx.calib))
