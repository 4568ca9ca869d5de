"""Op tables: the channel facts of each ATen op, declared as rows.

Each row maps an ATen overload to a rule; a rule reads its inputs' layouts from the analysis state and returns
its output layout. The algebra of each rule, for a tensor whose channels sit on axis ``a``:

* ``Elementwise``   y[c] = f(x[c])                      tie(In(0), Out)
* ``Broadcast``     y[c] = x0[c] (op) x1[c] ...          tie(all tensor inputs, Out); per-channel constants carried
* ``Spatial``       pooling over H, W only               tie(In(0), Out) when a is not a pooled axis
* ``Norm``          BatchNorm: y[c] = g[c](x[c]-m[c])/s[c] + b[c]   tie(In(0), Out), carry g, b, m, s
* ``Conv``          y[o] = sum_c W[o, c] * x[c]          consume(In(0)) produce(Out); depthwise: tie, carry W, b
* ``Linear``        y[o] = sum_c W[o, c] x[c] + b[o]     consume(In(0)) produce(Out)
* ``Flatten``       [.., C, H, W] -> [.., C*H*W]         the channel axis spans inner = H*W elements
* ``Concat``        cat on the channel axis              segments back to back (offsets); elsewhere: tie
* ``Pad``           pad(x, [l, r, ...]) of spatial axes  tie(In(0), Out)
* ``View``          view/reshape keeping the channel axis, or merging it outermost into one axis (like flatten)
* ``Reduce``        mean/sum over axes other than a      tie; over a: pin
* ``Getitem``       picks one layout of a tuple

An op missing from the table pins every space it touches. Adding an op is one row here (and a handler in
:mod:`grailc.surgery` only for a new weight layout).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from grailc.channels import Layout

aten = torch.ops.aten


def _ndim(st, arg) -> int | None:
    shape = st.shape(arg)
    return None if shape is None else len(shape)


def _pos(axis: int, ndim: int) -> int:
    return axis + ndim


class Elementwise:
    """y[c] = f(x[c]): the output keeps the input's channels."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        return st.layout(node.args[0])


class Broadcast:
    """Binary/ternary elementwise ops with broadcasting: every tensor input holds the same channels.

    A parameter with the channel count on the aligned axis is carried (sliced); one with size 1 there, or too
    few dims to reach it, is broadcast and untouched. A tensor input of size 1 on the channel axis is broadcast.
    """

    def __call__(self, node: fx.Node, st) -> Layout | None:
        out_shape = st.shape(node)
        tensors = [a for a in node.args if isinstance(a, fx.Node) and st.shape(a) is not None]
        data = [a for a in tensors if st.param(a) is None]
        layouts = [st.layout(a) for a in data]
        layouts = [lay for lay in layouts if lay is not None and not _broadcast_one(st, lay, data, layouts)]
        if not layouts:
            return st.fresh(node, f"{node.target} of constants at {st.where()}") if out_shape else None
        out = st.tie(layouts)
        params = []
        for a in tensors:
            target = st.param(a)
            if target is None:
                continue
            shape = st.shape(a)
            if len(shape) < -out.axis or shape[out.axis] == 1:
                continue
            if shape[out.axis] == out.size * out.inner and out.inner == 1:
                params.append((target, len(shape) + out.axis))
            else:
                st.pin(out, f"constant {target} of shape {list(shape)} does not follow the channels at {st.where()}")
        st.carrier(out, params)
        return out


def _broadcast_one(st, layout: Layout, data, layouts) -> bool:
    """True when this input has one channel and is broadcast against wider ones."""
    sizes = [lay.size * lay.inner for lay in layouts if lay is not None]
    return layout.size * layout.inner == 1 and max(sizes) > 1


class Spatial:
    """Ops acting on the last ``dims`` axes only (pooling, interpolation): channels pass through."""

    def __init__(self, dims: int = 2):
        self.dims = dims

    def __call__(self, node: fx.Node, st) -> Layout | None:
        lay = st.layout(node.args[0])
        if lay is None:
            return st.opaque("spatial op on an untracked tensor")
        if -lay.axis <= self.dims or lay.inner != 1:
            return st.opaque(f"{node.target} acts on the channel axis")
        if isinstance(node.meta.get("val"), (tuple, list)):  # (values, indices): indices carry no weights
            return (lay,) + (None,) * (len(node.meta["val"]) - 1)
        return lay


class Norm:
    """BatchNorm (eval): channel axis 1, per-channel parameters at the given argument positions."""

    def __init__(self, param_args: tuple[int, ...]):
        self.param_args = param_args

    def __call__(self, node: fx.Node, st) -> Layout | None:
        lay = st.layout(node.args[0])
        ndim = _ndim(st, node.args[0])
        if lay is None or ndim is None or _pos(lay.axis, ndim) != 1 or lay.inner != 1:
            return st.opaque("batch norm whose channel axis is not the tracked one")
        params = []
        for i in self.param_args:
            if i < len(node.args) and node.args[i] is not None:
                target = st.param(node.args[i])
                if target is None:
                    return st.opaque("batch norm with computed (non-parameter) statistics")
                params.append((target, 0))
        st.carrier(lay, params)
        if isinstance(node.meta.get("val"), (tuple, list)):
            return (lay,) + (None,) * (len(node.meta["val"]) - 1)
        return lay


class Conv:
    """conv(x, W, b, stride, padding, dilation, groups): W is [C_out, C_in/groups, *kernel]."""

    groups_arg = 6

    def __call__(self, node: fx.Node, st) -> Layout | None:
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        groups = node.args[self.groups_arg] if len(node.args) > self.groups_arg else 1
        weight, bias_t = st.param(w), st.param(bias)
        lay, shape, out_shape = st.layout(x), st.shape(x), st.shape(node)
        if weight is None or (bias is not None and bias_t is None):
            return st.opaque("convolution with computed (non-parameter) weights")
        if lay is None or shape is None or len(shape) < 3 or _pos(lay.axis, len(shape)) != 1 or lay.inner != 1:
            return st.opaque("convolution input without a tracked channel axis")
        c_in, c_out = shape[1], out_shape[1]
        axis = 1 - len(out_shape)
        if groups == 1:
            st.consumer("conv", weight, 0, lay)
            return st.producer("conv", weight, bias_t, out_shape, axis)
        if groups == c_in == c_out:
            params = [(weight, 0)] + ([(bias_t, 0)] if bias_t else [])
            st.carrier(lay, params, size_args=[(self.groups_arg, None, 1)])
            return lay.with_axis(axis)
        why = f"grouped convolution (groups={groups}, {c_in}->{c_out} channels) is kept whole"
        return st.opaque(why)


class Linear:
    """linear(x, W, b): W is [out, in]; x's last axis holds the channels (``inner`` elements each)."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        weight, bias_t = st.param(w), st.param(bias)
        lay, out_shape = st.layout(x), st.shape(node)
        if weight is None or (bias is not None and bias_t is None):
            return st.opaque("linear with computed (non-parameter) weights")
        if lay is None or lay.axis != -1:
            return st.opaque("linear input without a tracked last axis")
        st.consumer("linear", weight, 0, lay)
        return st.producer("linear", weight, bias_t, out_shape, -1)


class Flatten:
    """flatten(x, start, end): channels stay outermost in the merged axis, each spanning the rest."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        x = node.args[0]
        lay, shape = st.layout(x), st.shape(x)
        if lay is None or shape is None:
            return st.opaque("flatten of an untracked tensor")
        ndim = len(shape)
        start = node.args[1] if len(node.args) > 1 else 0
        end = node.args[2] if len(node.args) > 2 else -1
        start, end = start % max(ndim, 1), end % max(ndim, 1)
        pos = _pos(lay.axis, ndim)
        new_ndim = ndim - (end - start)
        if pos < start:
            return lay.with_axis(pos - new_ndim)
        if pos > end:
            return lay.with_axis(pos - (end - start) - new_ndim)
        if pos == start:
            inner = lay.inner
            for d in shape[start + 1 : end + 1]:
                if not isinstance(d, int):
                    return st.opaque("flatten over a dynamic size")
                inner *= d
            return Layout(start - new_ndim, lay.segments, inner)
        return st.opaque("flatten that splits the channel axis from the inside")


class Pad:
    """pad(x, [l, r, t, b, ...]): pads the last len/2 axes; channels pass through when they are not padded."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        lay = st.layout(node.args[0])
        padded = len(node.args[1]) // 2
        if lay is None or lay.inner != 1 or -lay.axis <= padded:
            return st.opaque("padding of the channel axis")
        return lay


def _same_dims(a, b) -> bool:
    """Equal shape prefixes, comparing symbolic sizes by their expression."""
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def _prod(dims) -> int | None:
    out = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        out *= d
    return out


class View:
    """view/reshape: channels survive when the dims before them are unchanged and the channel axis either keeps
    its size (the dims after it may be regrouped) or becomes the outermost part of one merged trailing axis
    (like flatten). A literal size for the channel axis in the target shape follows the new width."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        x = node.args[0]
        lay, src, dst = st.layout(x), st.shape(x), st.shape(node)
        if lay is None or src is None or dst is None:
            return st.opaque("view of an untracked tensor")
        p = len(src) + lay.axis
        q = p
        if not _same_dims(src[:p], dst[:q]) or q >= len(dst):
            return st.opaque("view that changes the axes before the channels")
        rest_src, rest_dst = _prod(src[p + 1 :]), _prod(dst[q + 1 :])
        if rest_src is None or rest_dst is None or not isinstance(dst[q], int):
            return st.opaque("view over dynamic sizes")
        if dst[q] == src[p] and rest_src == rest_dst and (lay.inner == 1 or _same_dims(src[p:], dst[q:])):
            out = Layout(q - len(dst), lay.segments, lay.inner)
        elif len(dst) == q + 1 and dst[q] == src[p] * rest_src:
            out = Layout(q - len(dst), lay.segments, lay.inner * rest_src)
        else:
            return st.opaque("view that splits or mixes the channel axis")
        target = node.args[1]
        if isinstance(target, (list, tuple)) and len(target) == len(dst) and target[q] != -1:
            if not isinstance(target[q], int):
                return st.opaque("view with a computed channel size")
            st.carrier(out, [], size_args=[(1, q, out.inner)])
        return out


class Concat:
    """cat(tensors, dim): on the channel axis the segments follow each other; elsewhere the inputs are tied."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else 0
        layouts = [st.layout(t) for t in tensors]
        ndim = _ndim(st, node)
        if any(lay is None for lay in layouts) or ndim is None:
            return st.opaque("concat of untracked tensors")
        dim = dim - ndim if dim >= 0 else dim
        if all(lay.axis == dim and lay.inner == 1 for lay in layouts):
            return Layout(dim, tuple(s for lay in layouts for s in lay.segments))
        if all(lay.axis != dim for lay in layouts):
            return st.tie(layouts)
        return st.opaque("concat mixing the channel axis with another")


class Reduce:
    """mean/sum/amax(x, dims, keepdim): channels pass through unless reduced over."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        x = node.args[0]
        lay, shape = st.layout(x), st.shape(x)
        if lay is None or shape is None or lay.inner != 1:
            return st.opaque("reduction of an untracked tensor")
        dims = node.args[1] if len(node.args) > 1 else None
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        ndim = len(shape)
        if dims is None:
            return st.opaque("reduction over all axes")
        dims = {d % ndim for d in ([dims] if isinstance(dims, int) else dims)}
        pos = _pos(lay.axis, ndim)
        if pos in dims:
            return st.opaque("reduction over the channel axis")
        if keepdim:
            return lay
        new_pos = pos - sum(1 for d in dims if d < pos)
        return lay.with_axis(new_pos - (ndim - len(dims)))


class Getitem:
    """operator.getitem on a tuple of layouts."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        src, idx = node.args
        found = st.layouts.get(src)
        if isinstance(found, tuple) and isinstance(idx, int) and idx < len(found):
            return found[idx]
        return st.opaque("getitem on an untracked value")


SHAPE_ONLY = {aten.sym_size.int}


def is_shape_only(node: fx.Node, st) -> bool:
    """Nodes that neither read nor produce channel data: shape queries, guards and assertions.

    ``sym_size`` of the channel axis would change after pruning, so it pins the tensor it reads.
    """
    if node.op == "call_module" and str(node.target).startswith("_guards"):
        return True
    if node.op != "call_function":
        return False
    if node.target in SHAPE_ONLY:
        lay = st.layout(node.args[0])
        ndim = _ndim(st, node.args[0])
        if lay is not None and ndim is not None and node.args[1] % ndim == _pos(lay.axis, ndim):
            st.pin(lay, f"the channel count is read as a number at {st.where()}")
        return True
    val = node.meta.get("val")
    has_tensor = isinstance(val, torch.Tensor) or (
        isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)
    )
    return not has_tensor and not any(st.layout(a) is not None for a in node.all_input_nodes)


def _rows(names: str, rule) -> dict:
    """Resolve space-separated 'op.overload' names on torch.ops.aten into table rows (missing ones skipped)."""
    rows = {}
    for name in names.split():
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:  # an op this torch build lacks cannot appear in its graphs
            rows[op] = rule
    return rows


ELEMENTWISE = """relu relu_ hardtanh hardtanh_ relu6 relu6_ gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_
    hardswish hardswish_ hardsigmoid hardsigmoid_ leaky_relu leaky_relu_ elu elu_ mish mish_ softplus
    dropout dropout_ clone alias detach contiguous neg abs exp erf sqrt rsqrt reciprocal square
    feature_dropout alpha_dropout lift_fresh_copy"""
BROADCAST = """add.Tensor add_.Tensor sub.Tensor sub_.Tensor mul.Tensor mul_.Tensor div.Tensor div_.Tensor
    add.Scalar add_.Scalar sub.Scalar mul.Scalar mul_.Scalar div.Scalar div_.Scalar pow.Tensor_Scalar
    clamp clamp_ clamp_min clamp_min_ clamp_max maximum minimum"""
SPATIAL = """max_pool2d avg_pool2d adaptive_avg_pool2d adaptive_max_pool2d upsample_nearest2d.vec
    upsample_bilinear2d.vec"""

OP_TABLE: dict = {
    **_rows(ELEMENTWISE, Elementwise()),
    **_rows(BROADCAST, Broadcast()),
    **_rows(SPATIAL, Spatial(2)),
    **_rows("max_pool2d_with_indices", Spatial(2)),
    **_rows("batch_norm _native_batch_norm_legit_no_training", Norm((1, 2, 3, 4))),
    **_rows("conv2d conv1d", Conv()),
    **_rows("linear", Linear()),
    **_rows("flatten.using_ints", Flatten()),
    **_rows("cat", Concat()),
    **_rows("pad constant_pad_nd", Pad()),
    **_rows("view reshape _unsafe_view", View()),
    **_rows("mean.dim sum.dim_IntList amax", Reduce()),
    operator.getitem: Getitem(),
}
