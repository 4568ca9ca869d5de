"""Dependency analysis: walk the graph once, apply each op's rule, and gather channel groups.

Every tensor value gets a :class:`~grailc.channels.Layout`. A rule (see :mod:`grailc.ops`) reads the layouts of
its inputs and returns its output's, declaring producers, consumers, carriers and ties on the way. An op without a
rule pins every space it touches (``unknown op``) and hands on a fresh pinned space: the analysis never guesses.
The graph's inputs and outputs are pinned too, so a model's interface never changes.
"""

from __future__ import annotations

import torch
from torch import fx

from grailc.channels import Layout, Segment, Spaces
from grailc.groups import Carrier, ChannelGroup, Consumer, ConsumerSlot, Dependencies, Producer


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
    """Where channels are assumed to sit in a tensor we know nothing about: NCHW's C, else the last dim."""
    if ndim == 0:
        return None
    return -3 if ndim == 4 else -1


class State:
    """What rules see: layouts of values, shapes, and the calls that record facts."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.spaces = Spaces()
        self.layouts: dict[fx.Node, Layout | tuple | None] = {}
        self.producers: list[Producer] = []
        self.consumers: list[Consumer] = []
        self.carriers: list[Carrier] = []
        self.unknown_ops: list[dict] = []
        self.param_users: dict[str, set[str]] = {}
        self.node: fx.Node | None = None

    # -- reading ---------------------------------------------------------------------------------------
    def shape(self, arg) -> tuple | None:
        return tensor_shape(arg)

    def param(self, arg) -> str | None:
        """The parameter target when ``arg`` is a get_attr of a tensor, else None."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return arg.target
        return None

    def layout(self, arg) -> Layout | None:
        """The layout of a tensor argument (a constant tensor gets a pinned space of its own)."""
        if not isinstance(arg, fx.Node):
            return None
        if arg not in self.layouts and arg.op == "get_attr":
            self.layouts[arg] = self.fresh(arg, f"constant tensor {arg.target} used as data")
        found = self.layouts.get(arg)
        return found if isinstance(found, Layout) else None

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

    def tie(self, layouts: list[Layout]) -> Layout | None:
        """Unify layouts that must hold the same channels; a mismatch pins them all."""
        layouts = [lay for lay in layouts if lay is not None]
        if not layouts:
            return None
        first = layouts[0]
        for other in layouts[1:]:
            same = (
                other.axis == first.axis
                and other.inner == first.inner
                and [s.size for s in other.segments] == [s.size for s in first.segments]
            )
            if not same:
                for lay in layouts:
                    self.pin(lay, f"{self.node.target} ties channels of different layouts at {self.where()}")
                return first
            for a, b in zip(first.segments, other.segments):
                self.spaces.union(a.space, b.space)
        return first

    def use_param(self, target: str | None) -> None:
        if target is not None:
            self.param_users.setdefault(target, set()).add(self.node.name)

    def producer(self, kind: str, weight: str, bias: str | None, out_shape: tuple, axis: int) -> Layout:
        size = out_shape[axis]
        sid = self.spaces.new(size)
        self.use_param(weight)
        self.use_param(bias)
        self.producers.append(Producer(self.node.name, param_module(weight), kind, weight, bias, sid))
        return Layout(axis, (Segment(sid, size),))

    def consumer(self, kind: str, weight: str, arg: int, layout: Layout) -> None:
        self.use_param(weight)
        self.consumers.append(Consumer(self.node.name, param_module(weight), kind, weight, arg, layout))

    def carrier(self, layout: Layout, params: list[tuple[str, int]], size_args=()) -> None:
        for target, _ in params:
            self.use_param(target)
        if params or size_args:
            mod = param_module(params[0][0]) if params else module_of(self.node)
            self.carriers.append(Carrier(self.node.name, mod, layout, params, list(size_args)))

    def opaque(self, why: str) -> Layout | None:
        """Pin every tensor input and return a fresh pinned space for the output (a rule that cannot follow)."""
        node = self.node
        reason = f"{why} at {self.where()}"
        for arg in node.all_input_nodes:
            lay = self.layouts.get(arg)
            for sub in lay if isinstance(lay, tuple) else (lay,):
                if isinstance(sub, Layout):
                    self.pin(sub, reason)
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return tuple(self.fresh(tuple(v.shape), reason) if isinstance(v, torch.Tensor) else None for v in val)
        return self.fresh(node, reason)

    def unknown(self, why: str) -> Layout | None:
        """An op without a table row: opaque, and listed in the report's unknown ops."""
        node = self.node
        self.unknown_ops.append({"node": node.name, "op": str(node.target), "module": module_of(node), "why": why})
        return self.opaque(why)


def analyse(gm: fx.GraphModule, table=None) -> Dependencies:
    """Find every channel group of ``gm`` (an exported ATen graph)."""
    from grailc.ops import OP_TABLE, is_shape_only

    table = OP_TABLE if table is None else table
    st = State(gm)
    for node in gm.graph.nodes:
        st.node = node
        if node.op == "placeholder":
            st.layouts[node] = st.fresh(node, "model input")
        elif node.op == "get_attr":
            continue
        elif node.op == "output":
            for arg in node.all_input_nodes:
                lay = st.layouts.get(arg)
                for sub in lay if isinstance(lay, tuple) else (lay,):
                    st.pin(sub, "model output")
        elif node.op == "call_function" and node.target in table:
            out = table[node.target](node, st)
            st.layouts[node] = out
            _check_layout(st, node, out)
        elif is_shape_only(node, st):
            st.layouts[node] = None
        else:
            what = node.target if node.op == "call_function" else f"{node.op} {node.target}"
            st.layouts[node] = st.unknown(f"unknown op {what}")
    return _gather(st)


def _check_layout(st: State, node: fx.Node, out) -> None:
    """A rule's output layout must describe the tensor it belongs to."""
    shape = tensor_shape(node)
    if isinstance(out, Layout) and shape is not None:
        if len(shape) < -out.axis or shape[out.axis] != out.size * out.inner:
            st.pin(out, f"layout does not match the shape {list(shape)} at {st.where()}")


def _gather(st: State) -> Dependencies:
    spaces = st.spaces
    for target, users in st.param_users.items():
        if len(users) > 1:
            for fact in [*st.producers, *st.consumers, *st.carriers]:
                if target in _params_of(fact):
                    for sid in _spaces_of(fact):
                        spaces.pin(sid, f"parameter {target} is shared by nodes {sorted(users)}")
    groups: dict[int, ChannelGroup] = {}

    def group(sid: int) -> ChannelGroup:
        root = spaces.find(sid)
        if root not in groups:
            groups[root] = ChannelGroup(root, spaces.sizes[root])
        return groups[root]

    for p in st.producers:
        group(p.space).producers.append(p)
    for c in st.consumers:
        for i, (seg, off) in enumerate(zip(c.layout.segments, c.layout.offsets())):
            group(seg.space).consumers.append(ConsumerSlot(c, i, off, seg.size))
    for car in st.carriers:
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
    groups = {k: groups[k] for k in sorted(groups)}
    return Dependencies(spaces, st.producers, st.consumers, st.carriers, groups, st.unknown_ops)


def _params_of(fact) -> list[str]:
    if isinstance(fact, Producer):
        return [fact.weight] + ([fact.bias] if fact.bias else [])
    if isinstance(fact, Consumer):
        return [fact.weight]
    return [t for t, _ in fact.params]


def _spaces_of(fact) -> list[int]:
    if isinstance(fact, Producer):
        return [fact.space]
    return [s.space for s in fact.layout.segments]
