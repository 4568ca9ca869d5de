"""Helpers for op-table and analysis tests: trace a module, prune one group by hand, compare channel values."""

from __future__ import annotations

import copy

import torch
from grailc.passes.apply import rewrite
from grailc.passes.calibrate import channel_rows
from torch import fx

from grailc.analysis import analyse
from grailc.channel_map import ChannelMap
from grailc.channels import Layout, Segment
from grailc.context import Decision
from grailc.surgery import get_param, layout_map, set_param
from grailc.trace import trace


class Recorder(fx.Interpreter):
    """Runs a graph and keeps the value of every node named in ``names``."""

    def __init__(self, gm, names):
        super().__init__(gm, garbage_collect_values=False)
        self.names, self.values = set(names), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out.detach().clone() if isinstance(out, torch.Tensor) else out
        return out


def traced(module: torch.nn.Module, shape):
    torch.manual_seed(0)
    module = module.eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics so that slicing them is visible
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    gm, _ = trace(module, (torch.randn(2, *shape[1:]),))
    return gm, analyse(gm)


def group_of(deps, module_name: str):
    for g in deps.groups.values():
        if module_name in g.modules():
            return g
    raise AssertionError(f"no group produced by {module_name}: {[g.modules() for g in deps.groups.values()]}")


def masked_reference(gm, group, keep: torch.Tensor):
    """A copy of ``gm`` whose consumers ignore the channels of ``group`` outside ``keep`` (weight columns zeroed).

    Pruning those channels must reproduce this model exactly: nothing downstream depends on them any more.
    """
    masked = copy.deepcopy(gm)
    drop = torch.tensor([c for c in range(group.size) if c not in set(keep.tolist())], dtype=torch.long)
    for slot in group.consumers:
        w = get_param(masked, slot.consumer.weight).detach().clone()
        cols = w.transpose(0, 1) if slot.consumer.dim == 0 else w
        view = cols.reshape(cols.shape[0], slot.consumer.layout.length, -1)
        view[:, slot.indices()[slot.map(ChannelMap.select(drop, group.size)).keep]] = 0
        cols.copy_(view.reshape(cols.shape))
        set_param(masked, slot.consumer.weight, w)
    return masked


def prune_and_compare(gm, deps, group, keep: torch.Tensor, x: torch.Tensor, atol: float = 1e-5) -> None:
    """Keeping ``keep`` of ``group`` must equal the masked reference: at the outputs, and at every consumer input
    (the original's kept channels)."""
    reference = masked_reference(gm, group, keep)
    pruned = copy.deepcopy(gm)
    decisions = {group.id: Decision(ChannelMap.select(keep, group.size))}
    rewrite(pruned, deps, decisions, {})
    pruned.recompile()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference(x), atol=atol, rtol=1e-4)
    maps_of = deps.maps_of(decisions)
    for slot in group.consumers:
        node = next(n for n in gm.graph.nodes if n.name == slot.consumer.node)
        arg = node.args[slot.consumer.arg]
        arg_after = next(n for n in pruned.graph.nodes if n.name == slot.consumer.node).args[slot.consumer.arg]
        before = Recorder(reference, [arg.name])
        after = Recorder(pruned, [arg_after.name])  # a rewritten channel shuffle reads a new gather node
        with torch.no_grad():
            before.run(x)
            after.run(x)
        layout = slot.consumer.layout
        idx = layout_map(layout, maps_of).keep
        new_layout = Layout(layout.axis, tuple(
            Segment(s.space, layout_map(Layout(layout.axis, (s,), 1, layout.granule), maps_of).k * layout.granule)
            for s in layout.segments), layout.inner, layout.granule)
        expected = channel_rows(before.values[arg.name], layout)[:, idx]
        got = channel_rows(after.values[arg_after.name], new_layout)
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4)
