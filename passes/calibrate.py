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
            raise CalibrationError(f"non-finite values (NaN/Inf) {_where_non_finite(n)}", fix=_non_finite_fix(n))
        return out


def _where_non_finite(n: fx.Node) -> str:
    """Where a NaN/Inf first showed up: a parameter, the model input, or the activations of a node."""
    if n.op == "get_attr":
        return f"in the model's parameter {n.target}"
    if n.op == "placeholder":
        return f"in the model input {n.name}"
    mod = module_of(n)
    return f"appeared in the activations of node {n.name} ({n.target})" + (f" in module {mod}" if mod else "")


def _non_finite_fix(n: fx.Node) -> str:
    if n.op == "get_attr":
        return "the weights are corrupt: retrain or reload them"
    if n.op == "placeholder":
        return "clean the calibration data, or keep it within the range of the model's dtype"
    return (
        "check the calibration data and the model's weights (an op outside its domain, e.g. log of a negative "
        "value, or fp16 overflow)"
    )


def format_bytes(size: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"  # pragma: no cover


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
                f"calibration needs {format_bytes(need)} ({need} bytes) for its Gram matrices, over the memory "
                f"budget of {format_bytes(budget)} ({budget} bytes); nothing was calibrated",
                fix=f"raise --max-memory to at least {format_bytes(need)}, or exclude the widest layers with a "
                "recipe 'exclude' pattern",
            )
        ctx.report["gram_memory_bytes"] = need
        batches = batches_for(ctx.gm, ctx.calib)
        ctx.grams, ctx.rows = record_grams(ctx.gm, ctx.deps, batches, ctx.progress)
