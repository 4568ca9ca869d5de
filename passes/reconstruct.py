"""Reconstruct: train small windows of the compressed graph against the dense model (label-free, with backprop).

GRAIL rebuilds each consumer's input in closed form, one matrix at a time; the errors it leaves accumulate along
the network. This optional pass, after ``apply`` (and ``repair``), refines the result window by window: the
compressed graph is cut into *windows* and each window's parameters are trained with Adam
(``reconstruct_optimizer = "rmsprop"``: RMSprop, as Wanda++'s regional optimisation uses) to minimise

    L(theta) = mean over calibration batches of || f_theta(z) - P y ||^2 / numel

where ``f_theta`` is the window of the compressed graph, ``z`` its input, ``y`` the dense model's value at the
window's last node and ``P`` the channel map of that node (``surgery.map_tensor`` through
``applied_deps.layouts``: the dense output's kept channels, or their merge for a fold; the identity where the width
was kept). Windows are trained one after the other in graph order; with ``fed = "compressed"`` (the default) the
window sees the output of the already reconstructed upstream, with ``fed = "dense"`` the dense model's input to the
window mapped the same way. No labels are used; the dense model is the teacher.

Windows come from the graph, not from module names (``find_windows``):

* ``block``: a *cut* is a node every path from the inputs to the outputs passes through (an articulation point of
  the dataflow; found in one sweep: in graph order, a node is a cut when no tensor edge jumps over it). A window
  closes at each cut that ends a region with parallel paths (a residual ``add``: a ResNet basic block, the attention
  or the MLP half of a transformer layer), extended over the parameter-free nodes that follow it (the block's ReLU,
  the pooling before a classifier); the nodes after the last one (the classifier) are the last window;
* ``layer``: the whole graph handed to ``compress`` is one window (for ``hf:`` models that graph is one decoder
  layer; for a CNN or ViT it is the whole model, matched at its outputs);
* ``group``: one window per pruned consumer (a conv or linear that reads a narrowed group): only that consumer's
  weight and bias are trained, to match the dense output of that node (matrix-level reconstruction, the baseline
  the paper finds weaker).

``params`` chooses what is trained: ``all`` (every parameter of the window), ``norms+biases`` (1-D parameters:
biases, BatchNorm/LayerNorm/RMSNorm weights) or ``lowrank`` (W + A B with A zero-initialised, rank
``reconstruct_rank``, for every weight of two or more dimensions, plus the 1-D parameters). A window whose loss is
not lower after training keeps its weights. Reconstruction changes parameter values only, never the graph, so
verification (permutation check, output error) and export run on it like on any other result.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass

import torch
from torch import fx
from tqdm import tqdm

from grailc.errors import RecipeError
from grailc.passmanager import Pass, register_pass
from grailc.surgery import get_param, is_parameter, map_tensor, set_param

KINDS = ("off", "block", "layer", "group")
PARAMS = ("all", "norms+biases", "lowrank")
FED = ("compressed", "dense")
OPTIMIZERS = {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}  # torch defaults besides lr


@dataclass
class Window:
    """A contiguous run of graph nodes (in graph order) whose parameters are trained together."""

    nodes: list[str]  # every node computed in the window, graph order
    targets: list[str]  # the nodes whose values are matched against the dense model
    trainable: list[str] | None = None  # parameter targets to train; None: every parameter the window reads
    label: str = ""


# -- the graph -----------------------------------------------------------------------------------------------------


def _carries_tensor(n: fx.Node) -> bool:
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)


def _output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return [a for a in out.all_input_nodes]


def _node_classes(gm: fx.GraphModule):
    """(computed, constant): the nodes that lead to an output and depend on a model input, in graph order, and the
    names of the nodes computed from constants only (parameters, buffers, constant expressions), which every window
    that needs them recomputes."""
    from_input: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in from_input for a in n.all_input_nodes):
            from_input.add(n)
    needed: set[fx.Node] = set()
    stack = _output_nodes(gm)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    computed = [n for n in gm.graph.nodes if n in needed and n in from_input and n.op != "placeholder"]
    constant = {n.name for n in gm.graph.nodes if n.op in ("get_attr", "call_function") and n not in from_input}
    return computed, constant


def _dataflow(gm: fx.GraphModule):
    """(computed nodes, tensor inputs, dataflow nodes): the inputs and the computed nodes reached from them along
    tensor edges (not through a size, as a class token's expand to the batch size is), in graph order."""
    computed, _ = _node_classes(gm)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and _carries_tensor(n)]
    reach = set(inputs)
    for n in computed:
        if _carries_tensor(n) and any(a in reach for a in n.all_input_nodes):
            reach.add(n)
    return computed, inputs, inputs + [n for n in computed if n in reach]


def cut_points(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes every path from the model inputs to its outputs passes through, in graph order.

    Graph order is topological, so a node v is such a cut exactly when no tensor edge a -> b (a and b on some
    input-to-output path) jumps over it, pos(a) < pos(v) < pos(b): a path that avoids v must cross its position on
    such an edge. Edges carrying sizes (SymInts) and constants are not dataflow and do not count."""
    computed, inputs, live = _dataflow(gm)
    pos = {n: i + 1 for i, n in enumerate(live)}  # 0: a virtual source before every input
    cover = [0] * (len(live) + 3)

    def jump(a: int, b: int) -> None:  # every position strictly between a and b is jumped over
        if b - a > 1:
            cover[a + 1] += 1
            cover[b] -= 1

    for n in inputs:
        jump(0, pos[n])
    for n in computed:
        if n not in pos:
            continue
        for a in n.all_input_nodes:
            if a in pos:
                jump(pos[a], pos[n])
    sink = len(live) + 1
    for n in _output_nodes(gm):
        if n in pos:
            jump(pos[n], sink)
    cuts, running = [], 0
    for n in live:
        running += cover[pos[n]]
        if running == 0 and n.op != "placeholder":
            cuts.append(n)
    return cuts


def _has_params(gm: fx.GraphModule, n: fx.Node) -> bool:
    return any(a.op == "get_attr" and is_parameter(gm, a.target) for a in n.all_input_nodes)


def find_windows(gm: fx.GraphModule, kind: str, consumers: list[str] | None = None) -> list[Window]:
    """The windows of ``gm`` for ``kind`` (block, layer, group; see the module docstring). ``consumers``: for
    ``group``, the names of the pruned consumer nodes."""
    computed, _ = _node_classes(gm)
    if not computed:
        return []
    order = {n: i for i, n in enumerate(computed)}
    outputs = [n.name for n in _output_nodes(gm) if n in order]
    ends: list[int] = []
    trainable: dict[int, list[str] | None] = {}
    if kind == "block":
        cuts = cut_points(gm)
        is_cut = set(cuts)
        _, inputs, dataflow = _dataflow(gm)
        flow = {n: i for i, n in enumerate(dataflow)}
        previous = len(inputs) - 1
        for c in cuts:
            i = order[c]
            first = ends[-1] + 1 if ends else 0
            # a region with parallel paths closes here (a window needs parameters: a norm's statistics alone, as
            # in RMSNorm's x * rsqrt(mean(x^2)), do not close one)
            if (flow[c] - previous > 1 and i >= first
                    and any(_has_params(gm, n) for n in computed[first : i + 1])):
                j = k = i
                # extend over the parameter-free chain that follows (the block's ReLU), up to the next parameters
                while k + 1 < len(computed):
                    k += 1
                    if computed[k] not in flow:  # a size computed in between
                        continue
                    if computed[k] not in is_cut or _has_params(gm, computed[k]):
                        break
                    j = k
                ends.append(j)
            previous = flow[c]
    elif kind == "group":
        wanted = set(consumers or [])
        for n in computed:
            if n.name in wanted:
                ends.append(order[n])
                trainable[order[n]] = [a.target for a in n.all_input_nodes
                                       if a.op == "get_attr" and is_parameter(gm, a.target)]
    elif kind == "layer":
        pass
    else:
        raise RecipeError(f"unknown reconstruct kind {kind!r}", fix=f"choose one of: {', '.join(KINDS[1:])}")
    windows, start = [], 0
    for e in ends:
        nodes = [n.name for n in computed[start : e + 1]]
        windows.append(Window(nodes, [computed[e].name], trainable.get(e)))
        start = e + 1
    if start < len(computed):  # the rest up to the outputs (the head; the whole graph for 'layer')
        nodes = [n.name for n in computed[start:]]
        inside = set(nodes)
        # group windows train pruned consumers only: the rest just carries values forward
        windows.append(Window(nodes, [o for o in outputs if o in inside], [] if kind == "group" else None))
    for w in windows:
        w.label = w.targets[-1] if w.targets else w.nodes[-1]
    return windows


class _Sub:
    """One window as a GraphModule of its own: inputs are the values it reads from earlier windows (tensors, sizes),
    outputs the values later windows or the model outputs read, parameters shared with the graph it was cut from."""

    def __init__(self, gm: fx.GraphModule, window: Window, later_reads: set[str], constant: set[str]):
        names = {n.name: n for n in gm.graph.nodes}
        inside = [names[s] for s in window.nodes]
        members = set(inside)
        externals: list[fx.Node] = []
        consts: list[fx.Node] = []
        seen: set[fx.Node] = set()

        def visit(a: fx.Node) -> None:
            if a in members or a in seen:
                return
            seen.add(a)
            if a.name in constant:
                for b in a.all_input_nodes:
                    visit(b)
                consts.append(a)
            else:
                externals.append(a)

        for n in inside:
            for a in n.all_input_nodes:
                visit(a)
        position = {n: i for i, n in enumerate(gm.graph.nodes)}
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for a in externals:
            env[a] = g.placeholder(a.name)
        for a in sorted(consts, key=position.__getitem__):
            env[a] = g.node_copy(a, lambda x: env[x])
        for n in inside:
            env[n] = g.node_copy(n, lambda x: env[x])
        self.inputs = [a.name for a in externals]
        self.outputs = [n.name for n in inside if n.name in later_reads]
        g.output(tuple(env[names[s]] for s in self.outputs))
        self.module = fx.GraphModule(gm, g)
        self.params = sorted({a.target for a in [*inside, *consts] if a.op == "get_attr"
                              and is_parameter(gm, a.target)})

    def __call__(self, values: dict, params: dict | None = None) -> dict:
        args = [values[s] for s in self.inputs]
        if params:
            out = torch.func.functional_call(self.module, params, tuple(args), strict=False)
        else:
            out = self.module(*args)
        return dict(zip(self.outputs, out))


def _later_reads(gm: fx.GraphModule, windows: list[Window]) -> list[set[str]]:
    """For each window, the names of its nodes read by a later window or by the model's outputs."""
    owner = {s: i for i, w in enumerate(windows) for s in w.nodes}
    reads = [set() for _ in windows]
    for n in gm.graph.nodes:
        mine = owner.get(n.name, len(windows))  # the output node (or an unused one): after every window
        for a in n.all_input_nodes:
            i = owner.get(a.name)
            if i is not None and i != mine:
                reads[i].add(a.name)
    for i, w in enumerate(windows):
        reads[i].update(w.targets)
    return reads


# -- training ------------------------------------------------------------------------------------------------------


def _rel_error(out: dict, target: dict, names: list[str]) -> float:
    num = sum(float((out[s].detach().double() - target[s].double()).pow(2).sum()) for s in names)
    den = sum(float(target[s].double().pow(2).sum()) for s in names)
    return num / max(den, 1e-300)


def _mse(out: dict, target: dict, names: list[str]) -> torch.Tensor:
    return sum(torch.nn.functional.mse_loss(out[s], target[s]) for s in names) / len(names)


class _Trainable:
    """The tensors the optimizer updates for one window and the parameters they give."""

    def __init__(self, gm: fx.GraphModule, targets: list[str], mode: str, rank: int, seed: int):
        self.base = {t: get_param(gm, t).detach() for t in targets if get_param(gm, t).is_floating_point()}
        self.full: dict[str, torch.Tensor] = {}
        self.lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        g = torch.Generator().manual_seed(seed)
        for t, w in self.base.items():
            if mode == "all" or w.dim() <= 1:
                self.full[t] = w.clone().requires_grad_(True)
            elif mode == "lowrank":
                rows, cols = w.shape[0], w[0].numel()
                r = min(rank, rows, cols)
                a = torch.zeros(rows, r, dtype=w.dtype, device=w.device, requires_grad=True)
                b = (torch.randn(r, cols, generator=g, dtype=torch.float32) / math.sqrt(cols)).to(w)
                self.lowrank[t] = (a, b.requires_grad_(True))

    def tensors(self) -> list[torch.Tensor]:
        return [*self.full.values(), *(x for ab in self.lowrank.values() for x in ab)]

    def count(self) -> int:
        return sum(t.numel() for t in self.tensors())

    def params(self) -> dict[str, torch.Tensor]:
        out = dict(self.full)
        for t, (a, b) in self.lowrank.items():
            out[t] = self.base[t] + (a @ b).view_as(self.base[t])
        return out


def _to_compressed(deps, maps_of, name: str, value):
    """The dense value of node ``name`` as the compressed model holds it (its channel map; the identity where the
    node carries no decided channels). Non-tensors (sizes) pass unchanged."""
    if not isinstance(value, torch.Tensor) or deps is None or maps_of is None:
        return value
    layout = deps.layouts.get(name)
    return value if layout is None else map_tensor(value, layout, maps_of)


def _channel_maps(ctx):
    deps = ctx.applied_deps
    return deps, (deps.maps_of(ctx.decisions) if deps is not None else None)


def pruned_consumers(ctx) -> list[str]:
    """The consumer nodes that read a group with a decision (their columns were narrowed or merged)."""
    deps = ctx.applied_deps
    if deps is None:
        return []
    decided = {gid for gid in ctx.decisions}
    find = deps.spaces.find
    return list(dict.fromkeys(c.node for c in deps.consumers
                              if any(find(s.space) in decided for s in c.layout.segments)))


def reconstruct(ctx) -> dict:
    """Train every window of ``ctx.gm`` against ``ctx.reference`` on ``ctx.calib``; returns the report."""
    from grailc.passes.calibrate import batches_for

    from grailc.trace import static_batch

    r = ctx.recipe
    kind, mode, fed = r.reconstruct, r.reconstruct_params, r.reconstruct_fed
    start = time.perf_counter()
    gm, ref = ctx.gm, ctx.reference
    windows = find_windows(ref, kind, pruned_consumers(ctx) if kind == "group" else None)
    constant = _node_classes(ref)[1] | _node_classes(gm)[1]  # gm's own: a bias that compensation added
    reads = _later_reads(ref, windows)
    last_use = _last_use(ref, windows, constant)
    deps, maps_of = _channel_maps(ctx)
    batches = _rebatch(batches_for(gm, ctx.calib), r.reconstruct_batch, static_batch(gm) is not None)
    dtype = next((p.dtype for p in gm.parameters()), torch.float32)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    dense_env = [dict(zip(placeholders, (t.to(dtype) if t.is_floating_point() else t for t in b)))
                 for b in batches]
    comp_env = [dict(e) for e in dense_env]
    report = {
        "kind": kind, "params": mode, "fed": fed, "optimizer": OPTIMIZERS[r.reconstruct_optimizer].__name__,
        "lr": r.reconstruct_lr,
        "steps": r.reconstruct_steps, "batches": len(batches),
        "batch_size": int(batches[0][0].shape[0]) if batches and batches[0] else 0,
        "backprop": True, "labels": False,
        "matched_on": "the dense output's channels through the channel map of the window's output "
                      "(kept channels; merged for a fold)",
        "windows": [],
    }
    if mode == "lowrank":
        report["rank"] = r.reconstruct_rank
    peak_cache = 0
    bar = tqdm(windows, desc="reconstruct", unit="window", disable=not ctx.progress, leave=False)
    for wi, (window, later) in enumerate(zip(bar, reads)):
        t0 = time.perf_counter()
        comp = _Sub(gm, window, later, constant)
        dense = _Sub(ref, window, later, constant)
        entry = {"window": window.label, "nodes": len(window.nodes)}
        with torch.no_grad():
            targets_full = [dense(e) for e in dense_env]
        targets = [{s: _to_compressed(deps, maps_of, s, t[s]) for s in window.targets} for t in targets_full]
        if fed == "dense":
            feeds = [{s: _to_compressed(deps, maps_of, s, e[s]) for s in comp.inputs} for e in dense_env]
        else:
            feeds = [{s: e[s] for s in comp.inputs} for e in comp_env]
        with torch.no_grad():
            outs = [comp(f) for f in feeds]
        problem = _shape_problem(outs[0] if outs else {}, targets[0] if targets else {}, window.targets)
        wanted = window.trainable if window.trainable is not None else comp.params
        train = _Trainable(gm, wanted, mode, r.reconstruct_rank, ctx.recipe.calib.seed + wi)
        entry["params"] = sum(train.base[t].numel() for t in train.base)
        entry["trained"] = train.count()
        if problem is not None:
            entry["skipped"] = problem
        elif not batches or train.count() == 0 or r.reconstruct_steps == 0:
            entry["skipped"] = "no trainable parameters" if train.count() == 0 else "no steps"
            entry["loss_before"] = entry["loss_after"] = _mean_error(outs, targets, window.targets)
        else:
            before = _mean_error(outs, targets, window.targets)
            opt = OPTIMIZERS[r.reconstruct_optimizer](train.tensors(), lr=r.reconstruct_lr)
            for step in range(r.reconstruct_steps):
                i = step % len(feeds)
                opt.zero_grad(set_to_none=True)
                loss = _mse(comp(feeds[i], train.params()), targets[i], window.targets)
                loss.backward()
                opt.step()
            with torch.no_grad():
                final = train.params()
                new_outs = [comp(f, final) for f in feeds]
            after = _mean_error(new_outs, targets, window.targets)
            entry["loss_before"] = before
            if after < before and math.isfinite(after):
                for t, value in final.items():
                    set_param(gm, t, value.detach())
                outs = new_outs
                entry["loss_after"] = after
            else:  # the window keeps its weights and its error
                entry["loss_after"], entry["loss_trained"] = before, after
                entry["kept_weights"] = "training did not lower the window's error"
        if fed == "compressed":  # the next windows see the reconstructed upstream
            for e, o in zip(comp_env, outs):
                e.update(o)
        for e, t in zip(dense_env, targets_full):
            e.update(t)
        _forget([*dense_env, *comp_env], last_use, wi)
        peak_cache = max(peak_cache, _bytes(dense_env) + (_bytes(comp_env) if fed == "compressed" else 0))
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        report["windows"].append(entry)
        if "loss_after" in entry:
            bar.set_postfix(window=window.label, error=f"{entry['loss_before']:.3g}->{entry['loss_after']:.3g}")
    trained = [w for w in report["windows"] if "loss_after" in w and "skipped" not in w]
    report["windows_trained"] = len(trained)
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["cached_activations_mib"] = round(peak_cache / 2**20, 2)
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if torch.cuda.is_available() and any(p.is_cuda for p in gm.parameters()):
        report["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return report


def _rebatch(batches: list[tuple], size: int, static: bool) -> list[tuple]:
    """The calibration inputs in minibatches of ``size`` (0, or a graph traced with a fixed batch: as given)."""
    if size <= 0 or static or not batches:
        return batches
    inputs = [torch.cat(column) for column in zip(*batches)]
    return list(zip(*(t.split(size) for t in inputs)))


def _shape_problem(out: dict, target: dict, names: list[str]) -> str | None:
    for s in names:
        a, b = out.get(s), target.get(s)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
            return (f"the compressed value of node {s} has shape {list(a.shape)} but the dense one maps to "
                    f"{list(b.shape)}: the analysis gives no channel map for it (applied_deps.layouts), so the "
                    "window was not trained; report it with the model (--reconstruct group trains the pruned "
                    "consumers alone meanwhile)")
    return None


def _mean_error(outs: list[dict], targets: list[dict], names: list[str]) -> float:
    return sum(_rel_error(o, t, names) for o, t in zip(outs, targets)) / max(1, len(outs))


def _last_use(gm: fx.GraphModule, windows: list[Window], constant: set[str]) -> dict[str, int]:
    """Node name -> index of the last window that reads its value (len(windows): the model's outputs)."""
    owner = {s: i for i, w in enumerate(windows) for s in w.nodes}
    last: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.name in constant or (n.op not in ("output",) and n.name not in owner):
            continue
        mine = owner.get(n.name, len(windows))
        for a in n.all_input_nodes:
            if a.name not in constant:
                last[a.name] = max(last.get(a.name, -1), mine)
    return last


def _forget(envs: list[dict], last_use: dict[str, int], done: int) -> None:
    """Drop the cached values that no window after ``done`` reads."""
    for env in envs:
        for s in [s for s in env if last_use.get(s, -1) <= done]:
            del env[s]


def _bytes(envs: list[dict]) -> int:
    return sum(v.numel() * v.element_size() for e in envs for v in e.values() if isinstance(v, torch.Tensor))


@register_pass
class Reconstruct(Pass):
    """Train windows of the compressed graph to match the dense model (parameters change, the graph does not)."""

    name = "reconstruct"

    def run(self, ctx) -> None:
        if ctx.recipe.reconstruct == "off":
            ctx.report["reconstruct"] = {"kind": "off"}
            return
        # the window's trained tensors are copies handed in by functional_call: no parameter of the graph takes a
        # gradient meanwhile, and each gets its flag back afterwards
        flags = [(p, p.requires_grad) for p in ctx.gm.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            ctx.report["reconstruct"] = reconstruct(ctx)
        finally:
            for p, flag in flags:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
