"""Calibrate: stream the calibration batches once and accumulate, per consumer slot of every prunable group,

    G = sum_rows x x^T          (x: the slot's channels at one position; rows = N*H*W for a conv input,
                                 N*inner for a linear after flatten, N*T for a token input)

in float64 (products of float32 rows, a chunk of ``PRODUCT_ROWS`` rows at a time, summed in float64: a relative
error of about 1e-7 per entry against float64 products, at half their cost). One pass serves all groups; in
``sequential`` mode (``calibrate_sequentially``) too, consumer by consumer, each consumer's statistics taken on
the model with everything upstream of it already compressed.
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
import dataclasses

import torch
from grailc.passes.taps import (
    TAPS_ROWS_PER_UNKNOWN,
    Kernel,
    dense_output,
    kept_taps,
    output_map,
    row_step,
    tap_kernel,
)
from torch import fx
from tqdm import tqdm

from grailc.analysis import module_of
from grailc.channels import Layout
from grailc.context import SlotStats, TapStats
from grailc.distributed import all_reduce_stats
from grailc.errors import CalibrationError, GrailcError
from grailc.passmanager import Pass, register_pass
from grailc.surgery import add_to_bias, fold_shift, get_param, mask_columns, narrow_inputs, set_param
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


def _slots_by_node(groups, only: set[str] | None = None) -> dict[str, list]:
    """The consumer slots of ``groups`` by consumer node (``only``: just the slots with these keys)."""
    found: dict[str, list] = {}
    for g in groups:
        for slot in g.consumers:
            if only is None or slot.key in only:
                found.setdefault(slot.consumer.node, []).append(slot)
    return found


def shared_rows(gm: fx.GraphModule, groups) -> dict[str, str]:
    """Per consumer slot, the key of the first slot that reads the same rows: the same tensor, in the same layout,
    the same indices of it (an Inception block's branches, a ResNet stage's first block and its shortcut). Their
    statistics are equal, so they are taken once. A tensor that an op may write into (``relu_``, or a call of
    unknown effect) after its first slot's consumer is not shared: a later consumer may read other values."""
    order = _node_order(gm)
    named = {n.name: n for n in gm.graph.nodes}
    slots = [slot for g in groups for slot in g.consumers]
    start: dict[str, int] = {}  # tensor -> where its first slot's consumer reads it
    for slot in slots:
        x = named[slot.consumer.node].args[slot.consumer.arg]
        if isinstance(x, fx.Node):
            start[x.name] = min(start.get(x.name, len(order)), order[slot.consumer.node])
    stable = {name for name, at in start.items() if not _written_after(named[name], order, at)}
    first: dict[tuple, str] = {}
    source: dict[str, str] = {}
    for slot in slots:
        c = slot.consumer
        x = named[c.node].args[c.arg]
        if not isinstance(x, fx.Node) or x.name not in stable:
            source[slot.key] = slot.key
            continue
        source[slot.key] = first.setdefault((x.name, c.layout, slot.offset, slot.size, slot.positions), slot.key)
    return source


def _written_after(x: fx.Node, order: dict[str, int], at: int) -> bool:
    """Whether a node after position ``at`` may write into ``x`` or a view of it (following views and in-place
    results, which alias it); a call whose effects are unknown counts as a write."""
    stack, seen = [x], set()
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            kind = _alias_of(user, n)
            if kind == "write" and order[user.name] > at:
                return True
            if kind in ("view", "write"):
                stack.append(user)
    return False


def _alias_of(node: fx.Node, arg: fx.Node) -> str | None:
    """How ``node`` uses its input ``arg``: "write" (it may write into it), "view" (its output may alias it) or
    None (it only reads it). From the op's schema; a Python function on values (``operator.getitem``) reads, and
    any other call without a schema may write."""
    if node.op == "output":
        return None
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        pure = node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator")
        return None if pure else "write"
    named = {a.name: a for a in schema.arguments}
    given = [*zip(schema.arguments, node.args), *((named[k], v) for k, v in node.kwargs.items() if k in named)]
    found = None
    for spec, value in given:
        if value is arg and spec.alias_info is not None:
            if spec.alias_info.is_write:
                return "write"
            found = "view"
    return found


def _copy_shared(source: dict[str, str], *stores: dict) -> None:
    """Each slot that shares another's rows gets its own copy of that slot's statistics."""
    for key, src in source.items():
        if key != src:
            for store in stores:
                value = store[src]
                store[key] = value.clone() if isinstance(value, torch.Tensor) else value


def _node_order(gm: fx.GraphModule) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(gm.graph.nodes)}


PRODUCT_ROWS = 16384  # rows per float32 product; the chunk sums are accumulated in float64
PREPASS_EVERY = 4  # its dense pre-pass, read only to select residual groups, runs every 4th batch


def row_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype activations are multiplied in: float32 (half precision upcast), float64 for a float64 model."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


SYMMETRIC_BLOCK = 256  # a^T a wider than this is formed block by block, the blocks below the diagonal skipped


def _upper_product(a: torch.Tensor, out: torch.Tensor, lo: int, hi: int) -> None:
    """out[lo:hi, lo:hi] = a[:, lo:hi]^T a[:, lo:hi] on and above the diagonal only (below: left as it is),
    halving the columns until they fit one block: about half the multiply-adds of one product. On this machine's
    BLAS 1.4x faster at 16k rows x 1024 columns, 1.25x at 3k x 1024 and 1.9x at 8k x 2048; no gain at 512 columns
    or below, and slower where the rows are fewer than twice the columns (small blocks), so not used there."""
    if hi - lo <= SYMMETRIC_BLOCK:
        out[lo:hi, lo:hi] = a[:, lo:hi].T @ a[:, lo:hi]
        return
    mid = (lo + hi) // 2
    _upper_product(a, out, lo, mid)
    _upper_product(a, out, mid, hi)
    out[lo:mid, mid:hi] = a[:, lo:mid].T @ a[:, mid:hi]


def products(a: torch.Tensor, b: torch.Tensor | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
    """a^T b (a^T a when b is None) in float64: ``PRODUCT_ROWS`` rows at a time multiplied in the rows' dtype and
    the chunk products summed in float64 (added in place into ``into`` when given: no float64 copy per batch); a
    wide a^T a only on and above the diagonal (``_upper_product``), mirrored once at the end."""
    out = into
    symmetric = b is None and a.shape[1] > 2 * SYMMETRIC_BLOCK and a.shape[0] >= 2 * a.shape[1]
    for start in range(0, max(1, a.shape[0]), PRODUCT_ROWS):
        pa = a[start : start + PRODUCT_ROWS]
        if symmetric:
            chunk = pa.new_zeros(a.shape[1], a.shape[1])
            _upper_product(pa, chunk, 0, a.shape[1])
        else:
            chunk = pa.T @ (pa if b is None else b[start : start + PRODUCT_ROWS])
        out = chunk.to(torch.float64) if out is None else out.add_(chunk)
    if symmetric:  # what ``into`` held is symmetric: mirroring the sum's upper triangle adds the new lower one
        out = out.triu().add_(out.triu(1).T)
    return out


def column_sums(a: torch.Tensor) -> torch.Tensor:
    """sum over rows of a, in float64: summed in the rows' dtype (a cascade sum: closer to the float64 sum than
    the product 1^T a, at half its cost; a sum accumulated in float64 costs several times more), then widened."""
    return a.sum(0).to(torch.float64)


def _accumulate(store: dict, key: str, value: torch.Tensor) -> None:
    store[key] = store[key].add_(value) if key in store else value


def _add_products(store: dict, key: str, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
    """store[key] += a^T b (``products``, in place)."""
    store[key] = products(a, b, into=store.get(key))


def _add_gram(grams: dict, rows: dict, sums: dict | None, key: str, x: torch.Tensor) -> None:
    """One batch's rows ``x`` of slot ``key``: grams[key] += x^T x, rows[key] += rows of x, sums[key] += sum x."""
    _add_products(grams, key, x)
    rows[key] = rows.get(key, 0) + x.shape[0]
    if sums is not None:
        _accumulate(sums, key, column_sums(x))


def record_grams(gm: fx.GraphModule, groups, batches: list[torch.Tensor], progress: bool = False,
                 sums: dict | None = None):
    """G = sum x x^T per consumer slot of ``groups``, streaming over the batches (and s = sum x into ``sums``); slots
    that read the same rows (``shared_rows``) are taken once."""
    grams, rows = {}, {}
    source = shared_rows(gm, groups)

    def add(slots, xr):
        for slot in slots:
            _add_gram(grams, rows, sums, slot.key, slot.take(xr))

    recorder = InputRecorder(gm, _slots_by_node(groups, {k for k, src in source.items() if k == src}), add,
                             check_nodes=False)
    for x in tqdm(batches, desc="calibrate", unit="batch", disable=not progress, leave=False):
        recorder.feed(x)
    _check_finite_statistics(gm, grams, batches)
    _copy_shared(source, grams, rows, *([sums] if sums is not None else []))
    return grams, rows


def record_sq_norms(gm: fx.GraphModule, groups, batches) -> dict[str, torch.Tensor]:
    """sum x^2 per channel (the diagonal of G) per consumer slot of ``groups``: what a global budget ranks by, at
    the memory of one vector per slot."""
    found: dict[str, torch.Tensor] = {}

    def add(slots, xr):
        for slot in slots:
            part = slot.take(xr)
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
    the nodes in order, each node's position and the position of its last user. ``update`` re-reads the graph
    after nodes were inserted."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.update()

    def update(self) -> None:
        self.nodes = list(self.gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.named = {n.name: n for n in self.nodes}
        self.last_use = {n: max((self.index[u] for u in n.users), default=self.index[n]) for n in self.nodes}
        self.parameters = [n for n in self.nodes if n.op == "get_attr"]


class Resumable:
    """One graph run on one batch node by node, able to stop before a node and go on later: sequential
    calibration and repair run all batches in lockstep this way, changing parameters between steps."""

    def __init__(self, order: GraphOrder, inputs: tuple[torch.Tensor, ...]):
        dtype = next((p.dtype for p in order.gm.parameters()), torch.float32)
        self.order, self.runner = order, fx.Interpreter(order.gm)
        self.runner.args_iter = iter([t.to(dtype) if t.is_floating_point() else t for t in inputs])
        self.pos = 0

    def run_until(self, stop: fx.Node, before: bool = False) -> None:
        """Run up to and including ``stop`` (up to its inputs only, with ``before``)."""
        env, order = self.runner.env, self.order
        end = order.index[stop] - (1 if before else 0)
        with torch.no_grad():
            while self.pos <= end:
                n = order.nodes[self.pos]
                env[n] = self.runner.run_node(n)
                for arg in n.all_input_nodes:
                    if order.last_use[arg] <= self.pos and arg.op != "placeholder":
                        env.pop(arg, None)
                self.pos += 1

    def consumer_rows(self, consumer) -> torch.Tensor:
        """The input of ``consumer`` (the run stopped before it) as [rows, C] (see ``channel_rows``)."""
        x = self.runner.env[self.order.named[consumer.node].args[consumer.arg]].detach()
        return channel_rows(x, consumer.layout).to(row_dtype(x))

    def resync(self, node: fx.Node) -> None:
        """Go on at ``node`` after the graph gained nodes (``GraphOrder.update``) or parameters changed: the
        parameters that nodes from here on read are fetched again, as they are now; those no node reads any more
        (a rewired consumer's former weight) are let go."""
        order, env = self.order, self.runner.env
        self.pos = order.index[node]
        for n in order.parameters:
            if order.index[n] < self.pos <= order.last_use[n]:
                env[n] = self.runner.run_node(n)
            elif order.last_use[n] < self.pos:
                env.pop(n, None)


ERROR_EVERY = 8  # the reported errors of sequential calibration come from every 8th row of a batch ...
ERROR_MIN_ROWS = 256  # ... but at least 256 rows of it (all of a smaller batch: small calibrations are exact)


def error_sample(rows: torch.Tensor) -> torch.Tensor:
    """The rows the reported reconstruction errors are estimated from: every ``ERROR_EVERY``-th, at least
    ``ERROR_MIN_ROWS`` of the batch (deterministic per batch, so the same in a data-parallel run)."""
    return rows[:: min(ERROR_EVERY, max(1, rows.shape[0] // ERROR_MIN_ROWS))]


def _take_pair(found: dict, prefix: str, key: str, a: torch.Tensor, b: torch.Tensor, K: torch.Tensor | None,
               gram: bool = True):
    """Add the products of dense rows ``a`` and shadow rows ``b`` to ``found`` (names with ``prefix``): Gz and C,
    only their kept block where the group's kept indices ``K`` are known; the sums and the row count. Without
    ``gram`` (Gz, its sums and the rows were recorded for the selection, ``record_shadow_grams``): C and the dense
    sums only."""
    bk = b if K is None else b[:, K]  # the kept block only, embedded once all batches are in
    if gram:
        _add_products(found[prefix + "gz"], key, bk)
        found[prefix + "rows"][key] = found[prefix + "rows"].get(key, 0) + a.shape[0]
        _accumulate(found[prefix + "sums"], key, column_sums(b))
    _add_products(found[prefix + "cross"], key, a, bk)
    _accumulate(found[prefix + "target_sums"], key, column_sums(a))


SAMPLED = "sample_"  # the names of the error sample's statistics in record_consumer_inputs' result


def record_shadow_grams(runs: list[tuple[Resumable, Resumable]], node: str, slots: list) -> dict[str, dict]:
    """Run every batch's shadow run on to the input of consumer ``node`` and return, per slot, what selecting its
    group reads: Gz = sum z z^T over all rows, sz = sum z and the row count (names "gz", "sums", "rows").
    ``record_consumer_inputs`` then takes C against the dense run on the kept columns alone."""
    found: dict[str, dict] = {"gz": {}, "sums": {}, "rows": {}}
    consumer = slots[0].consumer
    for _, shadow in runs:
        shadow.run_until(shadow.order.named[node], before=True)
        xs = shadow.consumer_rows(consumer)
        for slot in slots:
            _add_gram(found["gz"], found["rows"], found["sums"], slot.key, slot.take(xs))
    return found


def record_consumer_inputs(runs: list[tuple[Resumable, Resumable]], node: str, slots: list,
                           kept: dict[str, torch.Tensor] | None = None,
                           writer: tuple[str, torch.Tensor] | None = None,
                           selected: frozenset[str] = frozenset()) -> dict[str, dict]:
    """Run every batch's dense and shadow run on to the input of consumer ``node`` (not running it) and return,
    per consumer slot there: Gz = sum z z^T on the compressed shadow, C = sum x z^T against the dense inputs x,
    the row count, sz = sum z and sx = sum x (one dict per name, keyed by slot); and the same statistics plus
    Gx = sum x x^T over the error sample of rows (``error_sample``; names prefixed ``SAMPLED``), which only the
    reported errors read: a decision reads Gz, C and the sums of all rows (which compensation is refused compares
    errors whose difference has no Gx term), while an error estimated from one sample of rows for all of Gx, C
    and Gz is the norm of an actual residual on those rows, never below zero. Gx from all rows would cost a third
    of the products.

    ``kept``: for the slots whose group is selected, the kept indices K of the slot. Compensation and its errors
    read only Gz[K, K] and C[:, K], so only those are formed (the rest of the matrices stays zero): at half width
    3/8 of the two full products. ``selected``: the slots whose Gz over all rows, sz and row count were recorded
    for their group's selection at this node (``record_shadow_grams``): only C and sx are taken on all rows.

    ``writer`` (the stream's node name from ``stream_writers``, and P from ``writer_map``): the consumer adds
    its output into a residual stream, and its target x becomes x + P^T (h_dense - h_shadow), the stream's drift
    carried back to its input space."""
    found = _empty_found()
    consumer = slots[0].consumer
    kept = kept or {}
    for dense, shadow in runs:
        for run in (dense, shadow):
            run.run_until(run.order.named[node], before=True)
        xd, xs = dense.consumer_rows(consumer), shadow.consumer_rows(consumer)
        if writer is not None:
            xd = xd + _drift(dense, shadow, *writer, consumer.layout.axis).to(xd.dtype)
        for slot in slots:
            _add_rows(found, slot.key, slot.take(xd), slot.take(xs), kept.get(slot.key), slot.key not in selected)
    _embed_kept(found, kept)
    return found


def _empty_found() -> dict[str, dict]:
    names = ("gz", "cross", "rows", "sums", "target_sums")
    found: dict[str, dict] = {p + name: {} for name in names for p in ("", SAMPLED)}
    found[SAMPLED + "gx"] = {}
    return found


def _add_rows(found: dict, key: str, a: torch.Tensor, b: torch.Tensor, K: torch.Tensor | None,
              gram: bool = True) -> None:
    """Dense rows ``a`` and shadow rows ``b`` of one batch into ``found``: all rows (Gz only with ``gram``,
    see ``_take_pair``), and the error sample's."""
    _take_pair(found, "", key, a, b, K, gram)
    a, b = error_sample(a), error_sample(b)
    _take_pair(found, SAMPLED, key, a, b, K)
    _add_products(found[SAMPLED + "gx"], key, a)


def _embed_kept(found: dict, kept: dict[str, torch.Tensor]) -> None:
    """Gz[K, K] and C[:, K] formed alone become full-size matrices (zero elsewhere)."""
    for key, K in kept.items():
        size = found["target_sums"][key].shape[0]
        for prefix in ("", SAMPLED):
            if key in found[prefix + "gz"]:  # not where it was recorded whole for the selection
                found[prefix + "gz"][key] = _embed(found[prefix + "gz"][key], K, K, size)
            found[prefix + "cross"][key] = _embed(found[prefix + "cross"][key], None, K, size)


def record_taps(ctx, runs: list[tuple[Resumable, Resumable]], node: str, slot, kernel: Kernel, decision,
                batches) -> None:
    """The statistics of consumer ``node`` over its kept (channel, tap) pairs (:mod:`grailc.passes.taps`), from
    every batch's dense and shadow input (the runs stand before the node): Gz_p of the shadow's kept patches,
    T = sum y p_K(z)^T against the dense output y, the sums, and the error sample's with sum y y^T; into
    ``ctx.taps`` where the rows suffice (the report lists the node under ``kernel_taps``, else
    ``kernel_taps_few_rows``); there the dense runs go on past the node, whose output is y. ``decision``: the
    group's; ``batches``: the calibration batches, run again to say where a non-finite value came from (the
    consumer's own weight, which its input statistics do not see)."""
    cmap = slot.map(decision.map) if decision is not None else None
    if cmap is None or not cmap.is_selection:
        return
    K = kept_taps(cmap, kernel.taps)
    inputs = [tuple(run.runner.env[run.order.named[node].args[slot.consumer.arg]].detach() for run in pair)
              for pair in runs]
    rows = all_reduce_stats({"rows": sum(kernel.positions(xd.shape) for xd, _ in inputs)})["rows"]
    if rows < TAPS_ROWS_PER_UNKNOWN * len(K):
        ctx.report["kernel_taps_few_rows"].append(node)
        return
    step = row_step(rows, len(K), kernel.out_size(inputs[0][0].shape)[1]) if inputs else 1
    weight, keep = get_param(ctx.gm, slot.consumer.weight), cmap.keep
    found = _empty_found()
    for (xd, xs), (dense, _) in zip(inputs, runs):
        if xd.dtype == row_dtype(xd):  # the dense run computes y next anyway
            y = _dense_conv_rows(dense, node, step)
        else:  # a half-precision model: y in float32
            y = dense_output(xd.to(row_dtype(xd)), weight, kernel, step)
        z = kernel.patches(xs.index_select(1, keep.to(xs.device)).to(row_dtype(xs)), step)
        _add_rows(found, slot.key, y, z, None)
    final = final_statistics(**found)
    _check_finite_statistics(ctx.gm, {**final["gz"], **{k + " (T)": v for k, v in final["cross"].items()}}, batches)
    stats = [SlotStats(final[p + "gz"][slot.key], final[p + "cross"][slot.key], final.get(p + "gx", {}).get(slot.key),
                       final[p + "sums"][slot.key], final[p + "target_sums"][slot.key], final[p + "rows"][slot.key])
             for p in ("", SAMPLED)]
    ctx.taps[slot.key] = TapStats(*stats, output_map(weight, K))
    ctx.report["kernel_taps"].append(node)


def _dense_conv_rows(dense: Resumable, node: str, step: int) -> torch.Tensor:
    """[rows, O]: the dense run's own output of convolution ``node`` (run on to it), less its bias, one row per
    output position (every ``step``-th, in the order of ``Kernel.patches``): y = W p(x), which ``dense_output``
    would compute once more."""
    n = dense.order.named[node]
    dense.run_until(n)
    y = dense.runner.env[n].detach()
    bias = n.args[2] if len(n.args) > 2 else None
    if isinstance(bias, fx.Node):
        y = y - get_param(dense.order.gm, bias.target).detach().to(y.dtype)[:, None, None]
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])[::step]


ADDS = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)


def stream_writers(order: GraphOrder, at_node: dict[str, list]) -> dict[str, str]:
    """The consumer nodes that write into a residual stream: a linear layer (channels last) whose one use is
    ``add(h, y)``, ``h`` computed before it; each maps to the name of h's node. There the compressed model gives
    h_s + W' z_K where the dense one gives h_d + W x, so the consumer's target is the dense *stream*:
    W' z_K ~ W x + (h_d - h_s). In the input space that is the target x + P^T (h_d - h_s) with P = pinv(W)^T
    [out, in] (``writer_map``); W pinv(W) is the identity when W has full row rank (out <= in, as an attention's
    output projection or an MLP's down projection), else the drift's part in W's range is taken up. (A 1x1
    convolution reaching the add through BatchNorm is the same map scaled by the BatchNorm; tried on
    EfficientNet-Lite0 it changed nothing measurable, so convolutions are left out.)"""
    found = {}
    for name, slots in at_node.items():
        consumer, n = slots[0].consumer, order.named[name]
        layout = consumer.layout
        if consumer.kind != "linear" or layout.inner != 1 or layout.outer or layout.order is not None:
            continue
        users = list(n.users)
        if len(users) != 1 or users[0].target not in ADDS:
            continue
        args = users[0].args
        other = args[1] if args[0] is n else args[0] if len(args) > 1 and args[1] is n else None
        if isinstance(other, fx.Node) and order.index[other] < order.index[n]:
            found[name] = other.name
    return found


def writer_map(gm: fx.GraphModule, consumer) -> torch.Tensor:
    """P = pinv(W)^T [out, in] of a stream writer's (dense) weight, in float64."""
    return torch.linalg.pinv(get_param(gm, consumer.weight).detach().to(torch.float64)).T.contiguous()


STREAM_ROWS_PER_CHANNEL = 32  # a stream writer takes up the drift only with this many calibration rows per kept channel


def _writer_here(ctx, runs, node: str, slots: list, writers: dict, by_id: dict, group_of: dict):
    """(stream node, P) for ``record_consumer_inputs`` where ``node`` is a stream writer with enough rows, else None.

    The drift is a regression of the stream onto the kept channels, with as many unknowns per output as channels
    kept: with few rows per channel it fits the calibration rows' noise (SmolLM2's MLP, 768 channels kept: worse
    than the input target with 8k tokens, better with 32k). So a writer with fewer than
    ``STREAM_ROWS_PER_CHANNEL`` rows (over all processes) per kept channel keeps its input target; the report lists
    it under ``stream_writers_few_rows``. Where the dense run is fed another stream (``dense_calib``) a writer has
    no input target of its own to fall back to, and the caller decides (``grailc.llm.layerwise.stream_or_input``)."""
    if node not in writers:
        return None
    if ctx.dense_calib is None and not _enough_rows(ctx, runs, node, slots, by_id, group_of):
        ctx.report["stream_writers_few_rows"].append(node)
        return None
    ctx.report["stream_writers"].append(node)
    return writers[node], writer_map(ctx.gm, slots[0].consumer)


def _enough_rows(ctx, runs, node: str, slots: list, by_id: dict, group_of: dict) -> bool:
    """Whether the consumer at ``node`` sees ``STREAM_ROWS_PER_CHANNEL`` rows (all processes) per kept channel of
    its widest slot (the runs are brought to its input, as recording would)."""
    from grailc.passes.select import units_kept

    consumer, rows = slots[0].consumer, 0
    for dense, _ in runs:
        dense.run_until(dense.order.named[node], before=True)
        x = dense.runner.env[dense.order.named[node].args[consumer.arg]]
        rows += x.numel() // x.shape[consumer.layout.axis]
    rows = all_reduce_stats({"rows": rows})["rows"]
    kept = 0
    for slot in slots:
        group = by_id[group_of[slot.key]]
        if group.id in ctx.done:
            decision = ctx.decisions.get(group.id)
            kept = max(kept, slot.map(decision.map).k if decision is not None else slot.size)
        else:
            kept = max(kept, units_kept(ctx, group) * slot.size // group.size)
    return rows >= STREAM_ROWS_PER_CHANNEL * kept


def _drift(dense: Resumable, shadow: Resumable, stream: str, P: torch.Tensor, axis: int) -> torch.Tensor:
    """The stream's drift h_d - h_s at a stream writer (channels on ``axis``), carried to its input space:
    [rows, in], the rows in the order of ``channel_rows``."""
    h_d, h_s = (run.runner.env[run.order.named[stream]].detach() for run in (dense, shadow))
    if h_d.shape != h_s.shape or h_d.shape[axis] != P.shape[0]:
        raise CalibrationError(f"node {stream} (the residual stream a consumer adds into) has shape "
                               f"{list(h_d.shape)} and {list(h_s.shape)} on the two runs, not {P.shape[0]} channels",
                               fix="use --compensate-target input for this model")
    drift = (h_d - h_s).movedim(h_d.dim() + axis if axis < 0 else axis, -1).reshape(-1, P.shape[0])
    drift = drift.to(row_dtype(drift))
    return drift @ P.to(drift.dtype)


def _embed(block: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor, size: int) -> torch.Tensor:
    """A [size, size] zero matrix holding ``block`` at ``rows`` (all rows when None) x ``cols``."""
    out = block.new_zeros(size, size)
    if rows is None:
        out[:, cols] = block
    else:
        out[rows[:, None], cols] = block
    return out


def kept_indices(ctx, slots: list, group_of: dict[str, int]) -> dict[str, torch.Tensor]:
    """For the slots whose group is selected with a selection, the slot's kept indices K (empty when the group
    keeps everything: nothing is compensated); folds read all of Gz and C."""
    kept = {}
    for slot in slots:
        gid = group_of[slot.key]
        if gid not in ctx.done:
            continue
        decision = ctx.decisions.get(gid)
        if decision is None:
            kept[slot.key] = torch.zeros(0, dtype=torch.long)
            continue
        cmap = slot.map(decision.map)
        if cmap.is_selection:
            kept[slot.key] = cmap.keep
    return kept


def ahead_of_decision(gm: fx.GraphModule, groups) -> list:
    """Per group, the consumer slots that come after its first consumer node (a residual group's later blocks):
    the group is decided at its first consumer, so their selection statistics come from a dense pre-pass. The
    result holds views of the groups with only those slots (groups without any are left out)."""
    order = _node_order(gm)
    ahead = []
    for g in groups:
        first = min(order[s.consumer.node] for s in g.consumers)
        later = [s for s in g.consumers if order[s.consumer.node] > first]
        if later:
            ahead.append(dataclasses.replace(g, consumers=later))
    return ahead


def sequential_gram_bytes(gm: fx.GraphModule, groups, taps: bool = False) -> int:
    """Peak memory of sequential calibration's statistics: the dense pre-pass's Grams of the slots ahead of their
    group's decision, plus the five Grams (Gz and C of all rows, Gz, C and Gx of the error sample) of the slots at
    the widest consumer node and of those held there for later slots reading the same rows (``SharedStatistics``);
    with ``taps``, five more over (channel, tap) pairs and outputs at a convolution solved so (sized for all its
    channels kept: the kept width is not known before selection)."""
    order = _node_order(gm)
    at_node: dict[str, int] = {}
    for g in groups:
        for s in g.consumers:
            at_node[s.consumer.node] = at_node.get(s.consumer.node, 0) + 5 * 8 * s.size * s.size
    if taps:
        nodes = {n.name: n for n in gm.graph.nodes}
        for name, slots in _slots_by_node(groups).items():
            kernel = tap_kernel(gm, nodes[name], slots)
            if kernel is not None:  # Gz_p and its sample (at most (C * taps)^2), T and its sample, sum y y^T
                out = get_param(gm, slots[0].consumer.weight).shape[0]
                pairs = slots[0].size * kernel.taps
                at_node[name] += 8 * (2 * pairs * pairs + 2 * out * pairs + out * out)
    slot_of = {s.key: s for g in groups for s in g.consumers}
    last: dict[str, int] = {}  # per first slot read again, the last node reading its rows
    for key, src in shared_rows(gm, groups).items():
        last[src] = max(last.get(src, 0), order[slot_of[key].consumer.node])
    for src, end in last.items():
        first = slot_of[src]
        for name in at_node:
            if order[first.consumer.node] < order[name] <= end:
                at_node[name] += 5 * 8 * first.size * first.size
    return gram_bytes(ahead_of_decision(gm, groups)) + max(at_node.values(), default=0)


def prepass(gm: fx.GraphModule, ahead: list, batches) -> dict[str, dict]:
    """The dense statistics (grams, sums, rows) of the slots ``ahead`` of their group's decision, from every
    ``PREPASS_EVERY``-th batch, scaled up to all of them: they only rank channels, next to the statistics the
    first consumer takes from every batch."""
    some = batches[::PREPASS_EVERY]
    sums: dict = {}
    grams, rows = record_grams(gm, ahead, some, sums=sums)
    samples = {"all": sum(x[0].shape[0] for x in batches), "read": sum(x[0].shape[0] for x in some)}
    found = final_statistics(grams=grams, sums=sums, rows=rows, samples=samples)  # the counts of every process
    scale = found["samples"]["all"] / found["samples"]["read"]
    for name in ("grams", "sums"):
        found[name] = {key: value * scale for key, value in found[name].items()}
    found["rows"] = {key: round(value * scale) for key, value in found["rows"].items()}
    return found


def _select_ahead(ctx, group, ahead: dict) -> None:
    """Select for ``group`` at its first consumer: the slots there have their statistics on the compressed model;
    the later ones lend theirs from the dense pre-pass (``ahead``: grams, sums, rows) for the selection only; they
    are dropped after it."""
    from grailc.passes.select import select_group

    lent = [s.key for s in group.consumers if s.key in ahead["grams"] and s.key not in ctx.grams]
    stores = {"grams": ctx.grams, "sums": ctx.sums, "rows": ctx.rows}
    for key in lent:
        for name, store in stores.items():
            store[key] = ahead[name].pop(key)
    select_group(ctx, group)
    for key in lent:
        for store in stores.values():
            del store[key]


def calibrate_sequentially(ctx, batches, dense_batches=None) -> None:
    """One pass through the graph, all batches in lockstep, consumer by consumer: at each consumer, its input's
    statistics on the partially compressed model (the *shadow*) against the dense one; a group is selected at
    its first consumer, and every consumer slot is compensated when the pass reaches it, so that each consumer
    reconstructs the *dense* input from what the compressed model actually gives it there (everything upstream
    of it already compressed and compensated, the earlier blocks of its own residual group included).

    A group whose consumers sit at several nodes (a residual stage) is selected before the pass has seen its
    later consumers: for the selection only, those take their statistics from a dense pre-pass over every
    ``PREPASS_EVERY``-th batch (``ahead_of_decision``, ``prepass``). The compressed part is simulated on a
    shadow copy: each consumer's columns become W B on the kept channels and zero elsewhere and its bias b + W c,
    and once compensated it reads its kept channels alone (``narrow_inputs``: W B on index_select(z, K)), which
    computes exactly what the narrowed model computes, at the cost of a consumer of the compressed model (its
    producers still run at full width: they ran before their group was selected). Sums stay in ``ctx.sums`` (z)
    and ``ctx.target_sums`` (x); Grams are dropped once their slot is compensated.

    At a consumer node: where its group is selected there, Gz over all rows first (``record_shadow_grams``: what
    selection reads), then the selection, then the rest on the kept columns K alone (C[:, K], and Gz[K, K], C[:, K]
    and Gx on the error sample: ``record_consumer_inputs``); a k x k convolution solved over its taps takes its
    statistics there (``record_taps``) and none over channels; a slot reading the rows another slot read at an
    earlier node takes that slot's statistics (``SharedStatistics``).

    Cost: one dense and one (narrowed) shadow forward pass; per consumer slot Gz (all of it where selected, the
    kept block elsewhere), C[:, K] (a product with k of the columns) and the error sample (an eighth of the rows,
    ``error_sample``: 7/32 of a product at half width); plus the pre-pass (a quarter of a dense forward and
    of one product per slot ahead). Memory: per batch, the live activations of the dense and the shadow run (twice
    the activations of all calibration batches at the widest point of the graph), and ``sequential_gram_bytes``.

    ``dense_batches`` (default ``batches``): what the dense run, the pre-pass and a budget's plan are fed, batch by
    batch (a layer-by-layer driver passes the dense model's own stream). With ``compensate_target = "stream"``
    every stream writer (``stream_writers``) rebuilds the dense stream instead of its dense input: one
    [rows, out] x [out, in] product more per writer and batch, and the pseudo-inverse of its weight. With
    ``kernel_solve = "taps"`` each k x k convolution consumer also records its statistics over (channel, tap)
    pairs once its group is selected (``record_taps``): its dense output once more, and per row read the products
    O x (k * taps) and (k * taps)^2, and the error sample's.
    """
    from grailc.passes.compensate import compensate_group

    shadow = copy.deepcopy(ctx.gm)
    groups = ctx.deps.prunable()
    dense_batches = batches if dense_batches is None else dense_batches
    if len(dense_batches) != len(batches):
        raise CalibrationError(f"{len(dense_batches)} dense-run batches for {len(batches)} calibration batches",
                               fix="give the dense run one batch per calibration batch")
    if ctx.recipe.budget:  # the counts are planned on the dense model before anything is compressed
        from grailc.passes.select.global_budget import plan

        ctx.planned = plan(ctx, final_statistics(norms=record_sq_norms(ctx.gm, groups, dense_batches))["norms"])
    ahead = prepass(ctx.gm, ahead_of_decision(ctx.gm, groups), dense_batches)
    dense_order, shadow_order = GraphOrder(ctx.gm), GraphOrder(shadow)
    runs = [(Resumable(dense_order, d), Resumable(shadow_order, x)) for d, x in zip(dense_batches, batches)]
    at_node = _slots_by_node(groups)
    writers = {}
    if ctx.recipe.compensate_target == "stream":
        writers = stream_writers(dense_order, at_node)
        ctx.report["stream_writers"], ctx.report["stream_writers_few_rows"] = [], []
    kernels = {}
    if ctx.recipe.kernel_solve == "taps" and ctx.recipe.compensate != "none":  # nothing to solve without
        kernels = {node: k for node, slots in at_node.items()
                   if (k := tap_kernel(ctx.gm, dense_order.named[node], slots)) is not None}
        ctx.report["kernel_taps"], ctx.report["kernel_taps_few_rows"] = [], []
    by_id = {g.id: g for g in groups}
    group_of = {slot.key: g.id for g in groups for slot in g.consumers}
    shared = SharedStatistics(ctx.gm, groups)
    position = _node_order(ctx.gm)
    for node in tqdm(sorted(at_node, key=position.__getitem__), desc="sequential", unit="consumer",
                     disable=not ctx.progress, leave=False):
        slots = at_node[node]
        for run in (run for pair in runs for run in pair):  # every batch's two runs to the consumer's input
            run.run_until(run.order.named[node], before=True)
        writer = _writer_here(ctx, runs, node, slots, writers, by_id, group_of)
        fresh = [slot for slot in slots if group_of[slot.key] not in ctx.done]  # their groups are selected here
        if fresh:
            shadow_grams = final_statistics(**record_shadow_grams(runs, node, fresh))
            _check_finite_statistics(ctx.gm, shadow_grams["gz"], batches)
            for name, store in (("gz", ctx.grams), ("sums", ctx.sums), ("rows", ctx.rows)):
                store.update(shadow_grams[name])
            for g in (by_id[i] for i in dict.fromkeys(group_of[slot.key] for slot in fresh)):
                _select_ahead(ctx, g, ahead)
                ctx.done.add(g.id)
        if node in kernels:  # one slot; solved over its (channel, tap) pairs where the rows suffice
            record_taps(ctx, runs, node, slots[0], kernels[node], ctx.decisions.get(group_of[slots[0].key]), batches)
        by_channels = [slot for slot in slots if slot.key not in ctx.taps]  # the rest is solved over channels
        shared.lend(ctx, by_channels, writer)
        record = [slot for slot in by_channels if slot.key not in ctx.cross]
        if record:
            _record_by_channels(ctx, runs, node, record, kept_indices(ctx, record, group_of), writer,
                                frozenset(slot.key for slot in fresh), batches)
            shared.hold(ctx, record, writer)
        resume = shadow_order.named[node]
        for g in (by_id[i] for i in dict.fromkeys(group_of[slot.key] for slot in slots)):
            here = dataclasses.replace(g, consumers=[slot for slot in slots if group_of[slot.key] == g.id])
            compensate_group(ctx, here)
            decision = ctx.decisions.get(g.id)
            for slot in here.consumers if decision is not None else ():
                fold = ctx.folds.get(slot.key)
                weight = get_param(shadow, slot.consumer.weight)
                if fold is not None and fold.offset is not None:
                    if add_to_bias(shadow, slot.consumer,
                                   fold_shift(shadow, slot.consumer, weight, slot.indices(), fold)):
                        shadow_order.update()  # a new bias node; the runs interpret the graph, so no recompile
                set_param(shadow, slot.consumer.weight, mask_columns(weight, slot, slot.map(decision.map), fold))
        if (start := narrow_inputs(shadow, slots[0].consumer)) is not None:
            shadow_order.update()  # the consumer reads the kept channels alone, as in the compressed model
            resume = start
        for _, run in runs:  # this consumer and the ones after it read the new weights
            run.resync(resume)
        for slot in slots:  # a compensated slot's Grams are not needed again
            for store in (ctx.grams, ctx.cross, ctx.error_sample, ctx.taps):
                store.pop(slot.key, None)
            shared.done(slot)


def _record_by_channels(ctx, runs, node: str, slots: list, kept: dict, writer, selected: frozenset[str],
                        batches) -> None:
    """``record_consumer_inputs`` for these slots of consumer ``node``, over all processes, into ``ctx``."""
    final = final_statistics(**record_consumer_inputs(runs, node, slots, kept, writer, selected))
    _check_finite_statistics(ctx.gm, final["gz"], batches)
    for name, store in (("sums", ctx.sums), ("target_sums", ctx.target_sums), ("gz", ctx.grams),
                        ("cross", ctx.cross), ("rows", ctx.rows)):
        store.update(final[name])
    for slot in slots:
        ctx.error_sample[slot.key] = SlotStats(*(final[SAMPLED + name][slot.key] for name in (
            "gz", "cross", "gx", "sums", "target_sums", "rows")))


class SharedStatistics:
    """Sequential calibration's statistics of consumer slots that read the same rows at different nodes
    (``shared_rows``: an Inception block's branches, a stage's first block and its shortcut). Both runs give
    such slots the same tensors (a consumer in between changes its own weight, never its input) and the slots are
    one group's with the same indices (the same kept K), so the first slot's statistics are every later one's:
    they are held from its node until the last such slot is compensated, and not taken again. A stream writer's
    target has its own drift term (``_writer_here``): it neither lends nor borrows."""

    STORES = ("grams", "cross", "sums", "target_sums", "rows", "error_sample")

    def __init__(self, gm: fx.GraphModule, groups):
        self.source = shared_rows(gm, groups)
        self.left: dict[str, int] = {}  # per first slot, the slots reading its rows not compensated yet
        for src in self.source.values():
            self.left[src] = self.left.get(src, 0) + 1
        self.held: dict[str, dict] = {}

    def lend(self, ctx, slots: list, writer) -> None:
        """Give each slot that reads the rows of a held first slot that slot's statistics (read only, shared)."""
        for slot in slots if writer is None else ():
            src = self.source.get(slot.key, slot.key)
            if src != slot.key and src in self.held:
                for name, value in self.held[src].items():
                    getattr(ctx, name)[slot.key] = value

    def hold(self, ctx, slots: list, writer) -> None:
        """Hold the statistics just recorded for the first slots that later ones read the rows of."""
        for slot in slots if writer is None else ():
            if self.source.get(slot.key) == slot.key and self.left[slot.key] > 1:
                self.held[slot.key] = {name: getattr(ctx, name)[slot.key] for name in self.STORES
                                       if slot.key in getattr(ctx, name)}

    def done(self, slot) -> None:
        src = self.source.get(slot.key, slot.key)
        self.left[src] = self.left.get(src, 1) - 1
        if self.left[src] <= 0:
            self.held.pop(src, None)


def _cheaper_modes(ctx, groups, budget: int) -> str:
    """The advice, for a calibration over the memory budget, of the other modes that would fit (none: '')."""
    with_taps = sequential_gram_bytes(ctx.gm, groups, ctx.recipe.compensate != "none")
    channels = sequential_gram_bytes(ctx.gm, groups)
    taps = ctx.recipe.kernel_solve == "taps" and ctx.recipe.compensate != "none"
    if not ctx.recipe.sequential:
        if with_taps <= budget:
            return f"drop --one-shot (sequential calibration needs {format_bytes(with_taps)} here), "
        if channels <= budget:
            return (f"drop --one-shot and use --kernel-solve channels (sequential calibration then needs "
                    f"{format_bytes(channels)} here), ")
    elif taps and channels <= budget:
        return f"use --kernel-solve channels (needs {format_bytes(channels)} here), "
    return ""


@register_pass
class Calibrate(Pass):
    name = "calibrate"
    requires = ("deps",)

    def run(self, ctx) -> None:
        groups = ctx.deps.prunable()
        sequential = ctx.recipe.sequential
        taps = ctx.recipe.kernel_solve == "taps" and ctx.recipe.compensate != "none"
        need = sequential_gram_bytes(ctx.gm, groups, taps) if sequential else gram_bytes(groups)
        budget = ctx.recipe.max_memory_bytes
        if need > budget:
            raise GrailcError(
                f"calibration needs {format_bytes(need)} ({need} bytes) for its Gram matrices, over the memory "
                f"budget of {format_bytes(budget)} ({budget} bytes); nothing was calibrated",
                fix=f"raise --max-memory to at least {format_bytes(need)}, "
                + _cheaper_modes(ctx, groups, budget) + "or exclude the widest layers with a recipe 'exclude' pattern",
            )
        ctx.report["gram_memory_bytes"] = need
        batches = batches_for(ctx.gm, ctx.calib)
        if sequential:
            dense = batches_for(ctx.gm, ctx.dense_calib) if ctx.dense_calib else None
            calibrate_sequentially(ctx, batches, dense)
        else:
            sums: dict = {}
            grams, rows = record_grams(ctx.gm, groups, batches, ctx.progress, sums=sums)
            final = final_statistics(grams=grams, rows=rows, sums=sums)
            ctx.grams, ctx.rows = final["grams"], final["rows"]
            ctx.sums.update(final["sums"])
