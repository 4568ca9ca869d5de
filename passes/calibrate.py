"""Calibrate: stream the calibration batches once and accumulate, per consumer slot of every prunable group,

    G = sum_rows x x^T          (x: the slot's channels at one position; rows = N*H*W for a conv input,
                                 N*inner for a linear after flatten, N*T for a token input)

in float64 (products of float32 rows, a chunk of ``PRODUCT_ROWS`` rows at a time, summed in float64: a relative
error of about 1e-7 per entry against float64 products, at half their cost). One pass serves all groups; or, in
``sequential`` mode, group by group in graph order, each Gram is taken on the model with every earlier group
already compressed, which also bounds memory by the largest group.
Every selector and compensator reads only these Grams (activation norms are sqrt(diag G)) and the first moments
s = sum x (``ctx.sums``; the per-channel mean is s / rows), so memory is bounded by sum(d^2) over the slots, never by
the data. Each consumer's input is read just before the consumer
runs, so in-place ops later in the graph cannot change it. In a data-parallel run (``torchrun``, see
:mod:`grailc.distributed`) each process accumulates its share of the batches and ``final_statistics`` sums every
statistic over the processes before selection reads it. A non-finite activation stops calibration and names
the node where it first appeared.
"""

from __future__ import annotations

import copy

import torch
from torch import fx
from tqdm import tqdm

from grailc.analysis import module_of
from grailc.channels import Layout
from grailc.distributed import all_reduce_stats
from grailc.errors import CalibrationError, GrailcError
from grailc.passmanager import Pass, register_pass
from grailc.surgery import add_to_bias, get_param, mask_columns, offset_shift, set_param
from grailc.trace import static_batch


def channel_rows(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[rows, C]: one row per position, the channel axis last (a flattened axis is unfolded per position)."""
    axis = x.dim() + layout.axis
    x = x.movedim(axis, -1)
    if layout.inner > 1:
        x = x.reshape(*x.shape[:-1], layout.length, layout.inner).transpose(-1, -2)
    return x.reshape(-1, layout.length)


def gram_bytes(groups) -> int:
    """Memory the Grams of these groups take (float64)."""
    return sum(8 * s.size * s.size for g in groups for s in g.consumers)


def batches_for(gm: fx.GraphModule, batches: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    """Re-split batches (one tensor per input each) to the graph's static batch size when it has one."""
    fixed = static_batch(gm)
    if fixed is None:
        return batches
    inputs = [torch.cat(column) for column in zip(*batches)]
    usable = (inputs[0].shape[0] // fixed) * fixed
    if usable == 0:
        raise CalibrationError(
            f"the model was traced with a fixed batch of {fixed} but only {inputs[0].shape[0]} calibration inputs "
            "exist",
            fix="give more calibration inputs",
        )
    return list(zip(*(t[:usable].split(fixed) for t in inputs)))


class InputRecorder(fx.Interpreter):
    """Runs the graph and hands each watched consumer's input, as [rows, C] (float32 or float64, see
    ``row_dtype``), to ``on_input`` right
    before the consumer runs; names the node where activations stop being finite."""

    def __init__(self, gm: fx.GraphModule, slots_by_node: dict[str, list], on_input, check_nodes: bool = True):
        super().__init__(gm)
        self.slots_by_node, self.on_input = slots_by_node, on_input
        self.check_nodes = check_nodes  # off: the caller checks its statistics and reruns with it on to locate

    def run_node(self, n: fx.Node):
        slots = self.slots_by_node.get(n.name)
        if slots:
            consumer = slots[0].consumer
            x = self.env[n.args[consumer.arg]]
            self.on_input(slots, channel_rows(x.detach(), consumer.layout).to(row_dtype(x)))
        out = super().run_node(n)
        if self.check_nodes and isinstance(out, torch.Tensor) and out.is_floating_point() and not _finite(out):
            raise CalibrationError(f"non-finite values (NaN/Inf) {_where_non_finite(n)}", fix=_non_finite_fix(n))
        return out

    def feed(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """Run one batch (one tensor per model input); floating inputs are cast to the model's dtype."""
        dtype = next((p.dtype for p in self.module.parameters()), torch.float32)
        with torch.no_grad():
            self.run(*(t.to(dtype) if t.is_floating_point() else t for t in inputs))


def _finite(t: torch.Tensor) -> bool:
    """All values finite. The sum is one cheap pass and is finite whenever they all are (barring overflow, which
    the exact check below sorts out)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


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
    """1536 -> '1.50 KiB'."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def _slots_by_node(groups) -> dict[str, list]:
    found: dict[str, list] = {}
    for g in groups:
        for slot in g.consumers:
            found.setdefault(slot.consumer.node, []).append(slot)
    return found


def _node_order(gm: fx.GraphModule) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(gm.graph.nodes)}


PRODUCT_ROWS = 16384  # rows per float32 product; the chunk sums are accumulated in float64


def row_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype activations are multiplied in: float32 (half precision upcast), float64 for a float64 model."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def products(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """a^T b (a^T a when b is None) in float64: ``PRODUCT_ROWS`` rows at a time multiplied in the rows' dtype and
    the chunk products summed in float64."""
    out = None
    for start in range(0, max(1, a.shape[0]), PRODUCT_ROWS):
        pa = a[start : start + PRODUCT_ROWS]
        chunk = (pa.T @ (pa if b is None else b[start : start + PRODUCT_ROWS])).to(torch.float64)
        out = chunk if out is None else out.add_(chunk)
    return out


def column_sums(a: torch.Tensor) -> torch.Tensor:
    """sum over rows of a, in float64: the product 1^T a (a float64 ``sum`` costs several times more)."""
    return products(a.new_ones(a.shape[0], 1), a)[0]


def _accumulate(store: dict, key: str, value: torch.Tensor) -> None:
    store[key] = store[key] + value if key in store else value


def record_grams(gm: fx.GraphModule, groups, batches: list[torch.Tensor], progress: bool = False,
                 sums: dict | None = None):
    """G = sum x x^T per consumer slot of ``groups``, streaming over the batches (and s = sum x into ``sums``)."""
    grams, rows = {}, {}

    def add(slots, xr):
        for slot in slots:
            part = xr[:, slot.offset : slot.offset + slot.size]
            _accumulate(grams, slot.key, products(part))
            rows[slot.key] = rows.get(slot.key, 0) + part.shape[0]
            if sums is not None:
                _accumulate(sums, slot.key, column_sums(part))

    recorder = InputRecorder(gm, _slots_by_node(groups), add, check_nodes=False)
    for x in tqdm(batches, desc="calibrate", unit="batch", disable=not progress, leave=False):
        recorder.feed(x)
    _check_finite_statistics(gm, grams, batches)
    return grams, rows


def record_sq_norms(gm: fx.GraphModule, groups, batches) -> dict[str, torch.Tensor]:
    """sum x^2 per channel (the diagonal of G) per consumer slot of ``groups``: what a global budget ranks by, at
    the memory of one vector per slot."""
    found: dict[str, torch.Tensor] = {}

    def add(slots, xr):
        for slot in slots:
            part = xr[:, slot.offset : slot.offset + slot.size]
            _accumulate(found, slot.key, part.square().sum(0, dtype=torch.float64))

    recorder = InputRecorder(gm, _slots_by_node(groups), add, check_nodes=False)
    for x in batches:
        recorder.feed(x)
    return found


def final_statistics(**stores: dict) -> dict[str, dict]:
    """Where statistics become final, after accumulation and before anything is decided from them: each store
    (slot key -> tensor or row count) summed over the processes of a data-parallel run (``grailc.distributed``: this
    process accumulated only its share of the batches; one all-reduce for all stores, a no-op in one process) and
    moved to the CPU, where selection and compensation read them (dtypes kept: float64 Grams, int counts)."""
    flat = all_reduce_stats({(name, key): value for name, store in stores.items() for key, value in store.items()})
    done: dict[str, dict] = {name: {} for name in stores}
    for (name, key), value in flat.items():
        done[name][key] = value.cpu() if isinstance(value, torch.Tensor) else value
    return done


def _check_finite_statistics(gm: fx.GraphModule, grams: dict, batches) -> None:
    """Checking every node's output costs a third of calibration; a non-finite activation that reaches a consumer
    makes its Gram non-finite, so only then are the batches run again, node by node, to say where it appeared."""
    bad = [key for key, G in grams.items() if not _finite(G)]
    if not bad:
        return
    locator = InputRecorder(gm, {}, lambda slots, xr: None)
    for x in batches:
        locator.feed(x)  # raises at the first non-finite node
    raise CalibrationError(f"the input statistics of {bad[0]} overflowed to Inf (float64)",
                           fix="check the calibration data's scale and the model's weights")


class GraphOrder:
    """What stepping through a graph node by node needs, computed once for all the batches that step through it:
    the nodes in order, each node's position, the position of its last user, and the positions of the in-place ops
    that write it. ``update`` re-reads the graph after nodes were inserted."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.update()

    def update(self) -> None:
        self.nodes = list(self.gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.named = {n.name: n for n in self.nodes}
        self.last_use = {n: max((self.index[u] for u in n.users), default=self.index[n]) for n in self.nodes}
        self.written_at: dict[fx.Node, list[int]] = {}  # value -> positions of the in-place ops that write it
        for i, n in enumerate(self.nodes):
            for arg in _written_args(n):
                self.written_at.setdefault(arg, []).append(i)


class Resumable:
    """One graph run on one batch node by node, able to go back to a saved point: sequential calibration resumes
    each group where the previous group's consumers begin instead of at the model input.

    A saved point keeps the live values (not the parameters: get_attr values are fetched again on resume, since
    the shadow's weights change between groups)."""

    def __init__(self, order: GraphOrder, inputs: tuple[torch.Tensor, ...]):
        dtype = next((p.dtype for p in order.gm.parameters()), torch.float32)
        self.order, self.runner = order, fx.Interpreter(order.gm)
        self.runner.args_iter = iter([t.to(dtype) if t.is_floating_point() else t for t in inputs])
        self.pos, self.saved, self.saved_env = 0, None, {}

    def save(self) -> None:
        """Save the point before the current node; a value that an in-place op after it writes is copied."""
        self.saved = self.order.nodes[self.pos]
        written = self.order.written_at
        self.saved_env = {n: v.clone() if any(i >= self.pos for i in written.get(n, ())) else v
                          for n, v in self.runner.env.items() if n.op != "get_attr"}

    def restore(self) -> None:
        if self.saved is None:
            return
        order = self.order
        self.pos = order.index[self.saved]
        env = dict(self.saved_env)
        for n in order.nodes[: self.pos]:  # parameters read from here on, fetched as they are now
            if n.op == "get_attr" and order.last_use[n] >= self.pos:
                env[n] = self.runner.run_node(n)
        self.runner.env = env

    def run_until(self, stop: fx.Node, watch: dict[str, list] | None = None, on_input=None,
                  save_at: fx.Node | None = None) -> None:
        """Run up to and including ``stop``, handing each watched consumer's input to ``on_input`` (as
        InputRecorder does) and saving the point just before ``save_at``."""
        env, order = self.runner.env, self.order
        with torch.no_grad():
            while self.pos <= order.index[stop]:
                n = order.nodes[self.pos]
                if n is save_at:
                    self.save()
                slots = (watch or {}).get(n.name)
                if slots:
                    consumer = slots[0].consumer
                    x = env[n.args[consumer.arg]].detach()
                    on_input(slots, channel_rows(x, consumer.layout).to(row_dtype(x)))
                env[n] = self.runner.run_node(n)
                for arg in n.all_input_nodes:
                    if order.last_use[arg] <= self.pos and arg.op != "placeholder":
                        env.pop(arg, None)
                self.pos += 1


def _written_args(n: fx.Node) -> list[fx.Node]:
    """The arguments an in-place op (relu_, add_) writes, from its schema's alias annotations."""
    schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
    if schema is None:
        return []
    return [a for a, spec in zip(n.args, schema.arguments)
            if isinstance(a, fx.Node) and spec.alias_info is not None and spec.alias_info.is_write]


def record_cross_grams(runs: list[tuple[Resumable, Resumable]], group, sums: dict | None = None,
                       target_sums: dict | None = None):
    """For one group: Gz = sum z z^T on the compressed shadow, C = sum x z^T against the dense inputs x, and
    Gx = sum x x^T (all per consumer slot); sz = sum z into ``sums`` and sx = sum x into ``target_sums``. ``runs``
    holds a (dense, shadow) pair per batch, resumed from their saved points; each saves the point where this
    group's consumers begin, for the next group."""
    slots = _slots_by_node([group])
    order = runs[0][0].order  # the dense graph's, whose nodes the shadow's share by name
    first = min(slots, key=lambda name: order.index[order.named[name]])
    last = max(slots, key=lambda name: order.index[order.named[name]])
    gz, cross, gx, rows = {}, {}, {}, {}
    for dense, shadow in runs:
        found = {"x": [], "z": []}
        for which, run in (("x", dense), ("z", shadow)):
            named = run.order.named
            run.restore()
            run.run_until(named[last], slots, lambda s, xr, out=found[which]: out.append((s, xr)),
                          save_at=named[first])
        for (slots_d, xd), (_, xs) in zip(found["x"], found["z"]):
            for slot in slots_d:
                a = xd[:, slot.offset : slot.offset + slot.size]
                b = xs[:, slot.offset : slot.offset + slot.size]
                _accumulate(gz, slot.key, products(b))
                _accumulate(cross, slot.key, products(a, b))
                _accumulate(gx, slot.key, products(a))
                rows[slot.key] = rows.get(slot.key, 0) + a.shape[0]
                if sums is not None:
                    _accumulate(sums, slot.key, column_sums(b))
                    _accumulate(target_sums, slot.key, column_sums(a))
    return gz, cross, gx, rows


def graph_order(gm: fx.GraphModule, groups) -> list:
    """Groups sorted by the position of their first consumer in the graph."""
    order = _node_order(gm)
    return sorted(groups, key=lambda g: min(order[s.consumer.node] for s in g.consumers))


def calibrate_sequentially(ctx, batches) -> None:
    """Group by group in graph order: statistics on the partially compressed model against the dense one, then
    select and compensate, so that each consumer reconstructs the *dense* input from the compressed channels.

    The compressed part is simulated on a full-width shadow copy: each consumer's columns become W B on the kept
    channels and zero elsewhere and its bias b + W c, which computes exactly what the narrowed model computes.
    Sums stay in ``ctx.sums`` (z) and ``ctx.target_sums`` (x); the Grams of a finished group are dropped.

    Each group's pass resumes, per batch, from the point where the previous group's consumers begin (nothing
    before it changed), so the cost is the sum over groups of the span from the previous group's first consumer
    to this group's last, not groups x depth. Memory: per batch, the live activations of the dense and the
    shadow run and one saved point of each, i.e. about four times the activations of all calibration batches at
    the widest point of the graph.
    """
    from grailc.passes.compensate import compensate_group
    from grailc.passes.select import select_group

    shadow = copy.deepcopy(ctx.gm)
    groups = graph_order(ctx.gm, ctx.deps.prunable())
    if ctx.recipe.budget:  # the counts are planned on the dense model before anything is compressed
        from grailc.passes.select.global_budget import plan

        ctx.planned = plan(ctx, final_statistics(norms=record_sq_norms(ctx.gm, groups, batches))["norms"])
    dense_order, shadow_order = GraphOrder(ctx.gm), GraphOrder(shadow)
    runs = [(Resumable(dense_order, x), Resumable(shadow_order, x)) for x in batches]
    for g in tqdm(groups, desc="sequential", unit="group", disable=not ctx.progress, leave=False):
        sums, target_sums = {}, {}
        gz, cross, gx, rows = record_cross_grams(runs, g, sums, target_sums)
        _check_finite_statistics(ctx.gm, gz, batches)
        final = final_statistics(gz=gz, cross=cross, gx=gx, rows=rows, sums=sums, target_sums=target_sums)
        gz, cross, gx, rows = final["gz"], final["cross"], final["gx"], final["rows"]
        ctx.sums.update(final["sums"])
        ctx.target_sums.update(final["target_sums"])
        ctx.grams.update(gz)
        ctx.cross.update(cross)
        ctx.target_grams.update(gx)
        ctx.rows.update(rows)
        select_group(ctx, g)
        compensate_group(ctx, g)
        decision = ctx.decisions.get(g.id)
        if decision is not None:
            for slot in g.consumers:
                fold = ctx.folds.get(slot.key)
                weight = get_param(shadow, slot.consumer.weight)
                B = fold.B if fold is not None else None
                if fold is not None and fold.offset is not None:
                    add_to_bias(shadow, slot.consumer,
                                offset_shift(shadow, slot.consumer, weight, slot.offset, slot.size, fold.offset))
                    shadow.recompile()
                    shadow_order.update()  # a bias may have been added: new nodes
                set_param(shadow, slot.consumer.weight, mask_columns(weight, slot, slot.map(decision.map), B))
        for slot in g.consumers:  # a finished group's statistics are not needed again
            for store in (ctx.grams, ctx.cross, ctx.target_grams):
                store.pop(slot.key, None)
        ctx.done.add(g.id)


@register_pass
class Calibrate(Pass):
    name = "calibrate"
    requires = ("deps",)

    def run(self, ctx) -> None:
        groups = ctx.deps.prunable()
        sequential = ctx.recipe.sequential
        need = 3 * max((gram_bytes([g]) for g in groups), default=0) if sequential else gram_bytes(groups)
        budget = ctx.recipe.max_memory_bytes
        if need > budget:
            raise GrailcError(
                f"calibration needs {format_bytes(need)} ({need} bytes) for its Gram matrices, over the memory "
                f"budget of {format_bytes(budget)} ({budget} bytes); nothing was calibrated",
                fix=f"raise --max-memory to at least {format_bytes(need)}, "
                + ("" if sequential else "drop --one-shot (sequential calibration: memory of one group at a time), ")
                + "or exclude the widest layers with a recipe 'exclude' pattern",
            )
        ctx.report["gram_memory_bytes"] = need
        batches = batches_for(ctx.gm, ctx.calib)
        if sequential:
            calibrate_sequentially(ctx, batches)
        else:
            sums: dict = {}
            grams, rows = record_grams(ctx.gm, groups, batches, ctx.progress, sums=sums)
            final = final_statistics(grams=grams, rows=rows, sums=sums)
            ctx.grams, ctx.rows = final["grams"], final["rows"]
            ctx.sums.update(final["sums"])
