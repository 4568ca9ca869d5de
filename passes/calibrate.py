"""Calibrate: stream the calibration batches once and accumulate, per consumer slot of every prunable group,

    G = sum_rows x x^T          (x: the slot's channels at one position; rows = N*H*W for a conv input,
                                 N*inner for a linear after flatten, N*T for a token input)

in float64. Every selector and compensator reads only these Grams (activation norms are sqrt(diag G)), so memory
is bounded by sum(d^2) over the slots, never by the data. Each consumer's input is read just before the consumer
runs, so in-place ops later in the graph cannot change it. A non-finite activation stops calibration and names
the node where it first appeared.
"""

from __future__ import annotations

import torch
from torch import fx
from tqdm import tqdm

from grailc.analysis import module_of
from grailc.channels import Layout
from grailc.errors import CalibrationError, GrailcError
from grailc.passmanager import Pass, register_pass
from grailc.trace import static_batch


def channel_rows(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[rows, C]: one row per position, the channel axis last (a flattened axis is unfolded per position)."""
    axis = x.dim() + layout.axis
    x = x.movedim(axis, -1)
    if layout.inner > 1:
        x = x.reshape(*x.shape[:-1], layout.size, layout.inner).transpose(-1, -2)
    return x.reshape(-1, layout.size)


def gram_bytes(deps) -> int:
    """Memory the Grams of all prunable groups take (float64)."""
    return sum(8 * s.size * s.size for g in deps.prunable() for s in g.consumers)


def batches_for(gm: fx.GraphModule, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Re-split batches to the graph's static batch size when it has one."""
    fixed = static_batch(gm)
    if fixed is None:
        return batches
    rows = torch.cat(batches)
    usable = (rows.shape[0] // fixed) * fixed
    if usable == 0:
        raise CalibrationError(
            f"the model was traced with a fixed batch of {fixed} but only {rows.shape[0]} calibration inputs exist",
            fix="give more calibration inputs",
        )
    return list(rows[:usable].split(fixed))


class GramRecorder(fx.Interpreter):
    """Runs the graph and adds x x^T of each watched consumer input, right before the consumer runs."""

    def __init__(self, gm: fx.GraphModule, slots_by_node: dict[str, list], grams: dict, rows: dict):
        super().__init__(gm)
        self.slots_by_node, self.grams, self.rows = slots_by_node, grams, rows

    def run_node(self, n: fx.Node):
        slots = self.slots_by_node.get(n.name)
        if slots:
            consumer = slots[0].consumer
            x = self.env[n.args[consumer.arg]]
            xr = channel_rows(x.detach(), consumer.layout).to(torch.float64)
            for slot in slots:
                part = xr[:, slot.offset : slot.offset + slot.size]
                g = part.T @ part
                self.grams[slot.key] = self.grams[slot.key] + g if slot.key in self.grams else g
                self.rows[slot.key] = self.rows.get(slot.key, 0) + part.shape[0]
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
            mod = module_of(n)
            raise CalibrationError(
                f"non-finite values (NaN/Inf) appeared in the activations of node {n.name}"
                + (f" (module {mod})" if mod else ""),
                fix="check the calibration data and the model's weights; fp16 overflow is a common cause",
            )
        return out


def record_grams(gm: fx.GraphModule, deps, batches: list[torch.Tensor], progress: bool = False):
    """Grams per consumer slot of every prunable group."""
    slots_by_node: dict[str, list] = {}
    for g in deps.prunable():
        for slot in g.consumers:
            slots_by_node.setdefault(slot.consumer.node, []).append(slot)
    grams, rows = {}, {}
    recorder = GramRecorder(gm, slots_by_node, grams, rows)
    dtype = next((p.dtype for p in gm.parameters()), torch.float32)
    with torch.no_grad():
        for x in tqdm(batches, desc="calibrate", unit="batch", disable=not progress, leave=False):
            recorder.run(x.to(dtype))
    return grams, rows


@register_pass
class Calibrate(Pass):
    name = "calibrate"
    requires = ("deps",)

    def run(self, ctx) -> None:
        need = gram_bytes(ctx.deps)
        budget = ctx.recipe.max_memory_bytes
        if need > budget:
            raise GrailcError(
                f"the Gram matrices need {need / 2**30:.2f} GiB, over the memory budget of {budget / 2**30:.2f} GiB",
                fix="raise --max-memory, or exclude the widest layers with a recipe 'exclude' pattern",
            )
        ctx.report["gram_memory_bytes"] = need
        batches = batches_for(ctx.gm, ctx.calib)
        ctx.grams, ctx.rows = record_grams(ctx.gm, ctx.deps, batches, ctx.progress)
