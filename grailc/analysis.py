"""Dependency analysis: walk the graph once, apply each op's rule, and gather channel groups.

Every tensor value gets a :class:`~grailc.channels.Layout`, or None when it carries no channel of any group
(constants, masks, integer ids). A rule (see :mod:`grailc.ops`) reads the layouts of its inputs and returns its
output's, declaring producers, consumers, carriers and ties on the way. An op without a rule pins every space it
touches (``unknown op``) and hands on a fresh pinned space: the analysis never guesses. An op none of whose inputs
carries channels carries none either. The graph's inputs and outputs are pinned, so a model's interface never
changes.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import fx

from grailc.channels import Layout, Segment, Spaces
from grailc.groups import Carrier, ChannelGroup, Consumer, Dependencies, Producer, Slot


def module_of(node: fx.Node) -> str:
    """The dotted name of the module a node came from ('' for the top level)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path.replace("L['self'].", "").replace("L__self__.", "")
    return ""


def param_module(target: str) -> str:
    """'layer1.0.conv1.weight' -> 'layer1.0.conv1'."""
    return target.rsplit(".", 1)[0] if "." in target else ""


def tensor_shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def natural_axis(ndim: int) -> int | None:
    """Where channels are assumed to sit in a model input: NCHW's C for 4-D, else the last dim."""
    if ndim == 0:
        return None
    return -3 if ndim == 4 else -1


# ops through which a parameter keeps its trailing dims (negative axes stay valid)
PARAM_CHAIN = {"expand", "_to_copy", "to", "clone", "contiguous", "alias", "detach", "type_as", "lift_fresh_copy"}


RESHAPES_OF_ONES = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze"}


def _same_dim_without_ones(out: tuple, src: tuple, pos: int) -> int | None:
    """The dim of ``src`` that is dim ``pos`` of ``out`` when the reshape only adds or drops size-1 dims."""
    keep_out = [i for i, d in enumerate(out) if d != 1]
    keep_src = [i for i, d in enumerate(src) if d != 1]
    if [out[i] for i in keep_out] != [src[i] for i in keep_src] or pos not in keep_out:
        return None
    return keep_src[keep_out.index(pos)]


def _same_dim_of_view(out: tuple, src: tuple, pos: int) -> int | None:
    """The dim of ``src`` that a view keeps as dim ``pos`` of ``out`` (same size, same elements after it)."""
    after = math.prod(out[pos + 1 :])
    for p, size in enumerate(src):
        if size == out[pos] and math.prod(src[p + 1 :]) == after:
            return p
    return None


class State:
    """What rules see: layouts of values, shapes, and the calls that record facts."""

    def __init__(self, gm: fx.GraphModule, value_dims: bool = False):
        self.gm = gm
        self.value_dims = value_dims  # an attention's value is split into its within-head channels (not heads)
        self.spaces = Spaces()
        self.layouts: dict[fx.Node, Layout | tuple | None] = {}
        self.producers: list[Producer] = []
        self.consumers: list[Consumer] = []
        self.carriers: list[Carrier] = []
        self.unknown_ops: list[dict] = []
        self.param_users: dict[str, list[tuple[str, object]]] = {}
        self.node: fx.Node | None = None
        self.settled: dict[fx.Node, Layout] = {}  # later nodes of a pattern a rule recognised (a channel shuffle)

    # -- reading ---------------------------------------------------------------------------------------
    def shape(self, arg) -> tuple | None:
        return tensor_shape(arg)

    def param(self, arg) -> str | None:
        """The parameter target when ``arg`` is a get_attr of a tensor, else None."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return arg.target
        return None

    def layout(self, arg) -> Layout | None:
        """The layout of a tensor argument, split spaces read through their parts."""
        found = self.layouts.get(arg) if isinstance(arg, fx.Node) else None
        return self.layout_of(found) if isinstance(found, Layout) else None

    def param_chain(self, arg, axis: int) -> tuple[str, int, list[tuple[fx.Node, int]]] | None:
        """A parameter reached from ``arg`` through ops that only add, drop or broadcast size-1 dims (expand,
        unsqueeze, reshape to [1, C, 1, 1], dtype casts): its target, the dim that lines up with ``axis``
        (negative) and the nodes passed through, each with the position of the channel dim in its output."""
        chain = []
        shape = self.shape(arg)
        if shape is None or len(shape) < -axis:
            return None
        pos = len(shape) + axis
        while isinstance(arg, fx.Node) and arg.op == "call_function":
            name = getattr(arg.target, "__name__", "").split(".")[0]
            if not arg.args or not isinstance(arg.args[0], fx.Node):
                return None
            src = self.shape(arg.args[0])
            out = self.shape(arg)
            if src is None or out is None:
                return None
            if name in PARAM_CHAIN:
                new = pos - (len(out) - len(src))
            elif name in RESHAPES_OF_ONES:
                new = _same_dim_without_ones(out, src, pos)
                if new is None and name != "unsqueeze":
                    new = _same_dim_of_view(out, src, pos)
            elif name == "permute":
                new = [d % len(src) for d in arg.args[1]][pos]
            elif name == "index" and all(i is None or pos >= len(arg.args[1]) for i in arg.args[1]):
                new = pos - (len(out) - len(src))  # index tensors on leading dims: trailing dims stay
            else:
                return None
            if new is None or new < 0:
                return None
            chain.append((arg, pos))
            arg, pos = arg.args[0], new
        target = self.param(arg)
        return None if target is None else (target, pos, chain)

    def where(self) -> str:
        node = self.node
        mod = module_of(node)
        return f"node {node.name}" + (f" in {mod}" if mod else "")

    # -- recording -------------------------------------------------------------------------------------
    def fresh(self, value, pinned: str | None = None, axis: int | None = None) -> Layout | None:
        """A new space for a tensor value (``value`` is a node or a shape)."""
        shape = value if isinstance(value, tuple) else self.shape(value)
        if shape is None or len(shape) == 0:
            return None
        axis = natural_axis(len(shape)) if axis is None else axis
        size = shape[axis]
        if not isinstance(size, int):
            return None
        return Layout(axis, (Segment(self.spaces.new(size, pinned), size),))

    def pin(self, layout: Layout | None, reason: str) -> None:
        if layout is not None:
            for seg in layout.segments:
                self.spaces.pin(seg.space, reason)

    def lossy(self, layout: Layout, reason: str) -> None:
        for seg in layout.segments:
            self.spaces.mark_lossy(seg.space, f"{reason} at {self.where()}")

    def align(self, a: Layout, b: Layout) -> bool:
        """Tie two layouts of the same positions element by element (False when they cannot line up)."""
        if a.inner <= 0 or b.inner <= 0 or a.order != b.order:
            return False
        bounds_a = [(o * a.inner, a.seg_length(s) * a.inner) for s, o in zip(a.segments, a.offsets())]
        bounds_b = [(o * b.inner, b.seg_length(s) * b.inner) for s, o in zip(b.segments, b.offsets())]
        if bounds_a != bounds_b or (a.seg_axis is None) != (b.seg_axis is None):
            return False
        elements = max(a.inner, b.inner) if max(a.inner, b.inner) % min(a.inner, b.inner) == 0 else None
        if elements is None:
            return False
        per_a = a.granule * elements // a.inner
        per_b = b.granule * elements // b.inner
        return all(self.spaces.align(sa.space, per_a, sb.space, per_b) for sa, sb in zip(a.segments, b.segments))

    def tie(self, layouts: list[Layout]) -> Layout | None:
        """Unify layouts that hold the same positions; a mismatch pins them all."""
        layouts = [lay for lay in layouts if lay is not None]
        if not layouts:
            return None
        first = layouts[0]
        for other in layouts[1:]:
            same = other.axis == first.axis and other.seg_axis == first.seg_axis and other.outer == first.outer
            if not (same and self.align(first, other)):
                for lay in layouts:
                    self.pin(lay, f"{self.node.target} ties channels of different layouts at {self.where()}")
                return first
        return first

    def use_param(self, target: str | None, fact) -> None:
        if target is not None:
            self.param_users.setdefault(target, []).append((self.node.name, fact))

    def producer(self, kind: str, weight: str, bias: str | None, out_shape: tuple, axis: int, dim: int = 0) -> Layout:
        size = out_shape[axis]
        lay = Layout(axis, (Segment(self.spaces.new(size), size),))
        fact = Producer(self.node.name, param_module(weight), kind, weight, bias, lay, dim)
        self.use_param(weight, fact)
        self.use_param(bias, fact)
        self.producers.append(fact)
        return lay

    def consumer(self, kind: str, weight: str, arg: int, layout: Layout, dim: int = 1) -> None:
        fact = Consumer(self.node.name, param_module(weight), kind, weight, arg, layout, dim)
        self.use_param(weight, fact)
        self.consumers.append(fact)

    def carrier(self, layout: Layout, params: list[tuple[str, int]], size_args=(), tag=None, lossy=False,
                node: fx.Node | None = None, source: Layout | None = None) -> None:
        """Record what is sliced (or rewritten) along ``layout`` at this node (or at ``node``)."""
        node = node or self.node
        if params or size_args or tag or lossy:
            mod = param_module(params[0][0]) if params else module_of(node)
            fact = Carrier(node.name, mod, layout, params, list(size_args), tag, lossy, source)
            for target, _ in params:
                self.use_param(target, fact)
            self.carriers.append(fact)

    def opaque(self, why: str) -> Layout | None:
        """Pin every tensor input and return a fresh pinned space for the output (a rule that cannot follow)."""
        node = self.node
        reason = f"{why} at {self.where()}"
        for arg in node.all_input_nodes:
            lay = self.layouts.get(arg)
            for sub in lay if isinstance(lay, tuple) else (lay,):
                if isinstance(sub, Layout):
                    self.pin(self.layout_of(sub), reason)
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return tuple(self.fresh(tuple(v.shape), reason) if isinstance(v, torch.Tensor) else None for v in val)
        return self.fresh(node, reason)

    def layout_of(self, lay: Layout) -> Layout:
        return replace(lay, segments=self.spaces.resolve(lay.segments))

    def unknown(self, why: str) -> Layout | None:
        """An op without a table row: opaque, and listed in the report's unknown ops."""
        node = self.node
        self.unknown_ops.append({"node": node.name, "op": str(node.target), "module": module_of(node), "why": why})
        return self.opaque(why)


def _input_layouts(st: State, node: fx.Node) -> list[Layout]:
    """The layouts of a node's tensor inputs (each of a tuple's), untracked ones left out."""
    found = []
    for arg in node.all_input_nodes:
        lay = st.layouts.get(arg)
        found.extend(sub for sub in (lay if isinstance(lay, tuple) else (lay,)) if isinstance(sub, Layout))
    return found


def _tracked_inputs(st: State, node: fx.Node) -> bool:
    return bool(_input_layouts(st, node))


def _shuffled_input(st: State, node: fx.Node, rule) -> bool:
    """An input in a channel shuffle's order reaching a rule that does not follow orders."""
    if getattr(rule, "follows_order", False):
        return False
    return any(lay.order is not None for lay in _input_layouts(st, node))


def analyse(gm: fx.GraphModule, table=None, value_dims: bool = False) -> Dependencies:
    """Find every channel group of ``gm`` (an exported ATen graph). With ``value_dims`` the attention values are
    grouped by their within-head channels (value dims, the same kept in every head) instead of by heads."""
    from grailc.ops import OP_TABLE, SOURCES, is_shape_only

    table = OP_TABLE if table is None else table
    st = State(gm, value_dims)
    for node in gm.graph.nodes:
        st.node = node
        if node.op == "placeholder":
            val = node.meta.get("val")
            floating = isinstance(val, torch.Tensor) and val.is_floating_point()
            st.layouts[node] = st.fresh(node, "model input") if floating else None
        elif node.op == "get_attr":
            continue
        elif node.op == "output":
            for arg in node.all_input_nodes:
                lay = st.layouts.get(arg)
                for sub in lay if isinstance(lay, tuple) else (lay,):
                    if isinstance(sub, Layout):
                        st.pin(st.layout_of(sub), "model output")
        elif node in st.settled:
            st.layouts[node] = st.settled.pop(node)
        elif is_shape_only(node, st):
            st.layouts[node] = None
        elif node.op == "call_function" and node.target not in SOURCES and not _tracked_inputs(st, node):
            st.layouts[node] = None  # computed from constants and ids only: no channel flows through it
        elif node.op == "call_function" and node.target in table and _shuffled_input(st, node, table[node.target]):
            st.layouts[node] = st.opaque(f"{node.target} of channels in a channel shuffle's order")
        elif node.op == "call_function" and node.target in table:
            out = table[node.target](node, st)
            st.layouts[node] = out
            _check_layout(st, node, out)
        else:
            what = node.target if node.op == "call_function" else f"{node.op} {node.target}"
            st.layouts[node] = st.unknown(f"unknown op {what}")
    return _gather(st)


def _check_layout(st: State, node: fx.Node, out) -> None:
    """A rule's output layout must describe the tensor it belongs to."""
    shape = tensor_shape(node)
    if isinstance(out, Layout) and shape is not None:
        fits = len(shape) >= -out.axis and (out.outer or shape[out.axis] == out.length * out.inner)
        if out.seg_axis is not None:
            fits = fits and len(shape) >= -out.seg_axis and shape[out.seg_axis] == len(out.segments)
        if not fits:
            st.pin(st.layout_of(out), f"layout does not match the shape {list(shape)} at {st.where()}")


def _gather(st: State) -> Dependencies:
    spaces = st.spaces
    _tie_shared_params(st)
    groups: dict[int, ChannelGroup] = {}

    def group(sid: int) -> ChannelGroup:
        root = spaces.find(sid)
        if root not in groups:
            groups[root] = ChannelGroup(root, spaces.units(root))
        return groups[root]

    for facts, store in ((st.producers, "producers"), (st.consumers, "consumers")):
        for fact in facts:
            fact.layout = st.layout_of(fact.layout)
            lay = fact.layout
            for i, (seg, off) in enumerate(zip(lay.segments, lay.offsets())):
                per_unit = spaces.unit(seg.space) // lay.granule
                positions = lay.seg_positions(i) if lay.order is not None else None
                getattr(group(seg.space), store).append(Slot(fact, i, off, lay.seg_length(seg), per_unit, positions))
    for car in st.carriers:
        car.layout = st.layout_of(car.layout)
        car.source = st.layout_of(car.source) if car.source is not None else None
        for seg in car.layout.segments:
            g = group(seg.space)
            if car not in g.carriers:
                g.carriers.append(car)
    for root, g in groups.items():
        reasons = spaces.pinned(root)
        if not reasons and not g.producers:
            reasons = ["no producer with weights computes these channels"]
        if not reasons and not g.consumers:
            reasons = ["no consumer reads these channels"]
        g.pinned = "; ".join(reasons) if reasons else None
        g.understood = not reasons
        g.joins = list(spaces.joins.get(root, []))
        lossy = spaces.lossy(root)
        g.lossy = (lossy[0] + (f" (and {len(lossy) - 1} more normalisations)" if len(lossy) > 1 else "")
                   if lossy else None)
    groups = {k: groups[k] for k in sorted(groups)}
    layouts = {n.name: st.layout_of(lay) for n, lay in st.layouts.items() if isinstance(lay, Layout)}
    return Dependencies(spaces, st.producers, st.consumers, st.carriers, groups, st.unknown_ops, layouts)


def _tie_shared_params(st: State) -> None:
    """A module called more than once: the same rows (producers) or slices (carriers) hold the same channels, so
    their spaces are tied; a shared consumer weight cannot take two merges, so its input channels are pinned."""
    for target, uses in st.param_users.items():
        nodes = sorted({n for n, _ in uses})
        if len(nodes) < 2:
            continue
        reason = f"parameter {target} is shared by nodes {nodes}"
        facts = list({id(f): f for _, f in uses}.values())
        for role in (Producer, Carrier, Consumer):
            layouts = [st.layout_of(f.layout) for f in facts if type(f) is role]
            if len(layouts) < 2:
                continue
            same = all(lay.size == layouts[0].size and len(lay.segments) == len(layouts[0].segments)
                       for lay in layouts)
            if role is not Consumer and same and all(
                st.spaces.union(a.space, b.space) for lay in layouts[1:]
                for a, b in zip(layouts[0].segments, lay.segments)
            ):
                continue
            for lay in layouts:
                for seg in lay.segments:
                    st.spaces.pin(seg.space, reason)
