"""Op tables: the channel facts of each ATen op, declared as rows.

Each row maps an ATen overload to a rule; a rule reads its inputs' layouts from the analysis state and returns
its output layout (see :mod:`grailc.channels` for what a layout says). The algebra of each rule, for a tensor whose
channels sit on axis ``a``:

* ``Elementwise``   y[c] = f(x[c])                         tie(In(0), Out)
* ``Broadcast``     y[c] = x0[c] (op) x1[c] ...             tie(all tensor inputs, Out); per-channel parameters
                                                            (also through expand/casts: class tokens) carried
* ``Spatial``       pooling/resizing over the last dims     tie(In(0), Out) when a is not one of them
* ``BatchNorm``     y[c] = g[c](x[c]-m[c])/s[c] + b[c]      tie(In(0), Out), carry g, b, m, s
* ``LayerNorm``     y = g (x - mean_c x) / std_c x + b      tie, carry g, b; *lossy*: the statistics run over a
* ``GroupNorm``     statistics per block of C/G channels    whole blocks kept (unit C/G): exact; carry g, b, G
* ``Conv``          y[o] = sum_c W[o, c] * x[c]             consume(In(0)) produce(Out); transposed: W^T;
                                                            groups > 1: block j of x goes with block j of y
* ``Linear``        y[o] = sum_c W[o, c] x[c] + b[o]        consume(In(0)) produce(Out); a linear over a dim
                                                            without channels passes them through
* ``Embedding``     y[t, c] = W[ids[t], c]                  produce(Out) from W's columns
* ``Reshape``       view/reshape/flatten/unflatten          merge following dims into ``inner``, split the axis
                                                            into [units, granule...] (heads), or move the dims
                                                            before it (window partitions)
* channel shuffle   view [.., g, C/g, ..], transpose, view   an index map: the output's layout gets an ``order``
                                                            (no tie); rewritten as one gather of the kept channels
* ``Permute``       permute/transpose/unsqueeze/squeeze     the axes move
* ``Select``        select/unbind on another dim: moves axes; on a segment axis: one segment each
* ``Split``         split/chunk on the channel axis         segments (like cat in reverse); elsewhere: tie; after a
                                                            shuffle each space splits into the parts of each output
* ``Stack``         stack(tensors, dim)                     tie the inputs; a new dim appears
* ``Concat``        cat on the channel axis                 segments back to back (offsets); elsewhere: tie
* ``Reduce``        mean/sum/var over dims                  tie; over a with keepdim: lossy (a norm statistic)
* ``Attention``     softmax(q k^T) v per head               heads of q, k, v tied (k, v repeated r times for
                                                            grouped-query attention); the output's heads with them;
                                                            with value dims: out[h, d] follows v[h, d], q and k pinned
* ``Matmul``        batched a @ b                           batch axes tied; contracting a channel axis pins
* ``Getitem``       picks one layout of a tuple

An op missing from the table pins every space it touches, and so does a row without ``follows_order`` that meets
channels in a shuffle's order. Adding an op is one row here (and a handler in
:mod:`grailc.surgery` only for a new weight layout).
"""

from __future__ import annotations

import math
import operator
from dataclasses import replace

import torch
from torch import fx

from grailc.channels import Layout, Segment

aten = torch.ops.aten


def _ndim(st, arg) -> int | None:
    shape = st.shape(arg)
    return None if shape is None else len(shape)


def _pos(axis: int, ndim: int) -> int:
    return axis + ndim


def _dim(d: int, ndim: int) -> int:
    """A dim argument as a positive index."""
    return d % max(ndim, 1)


def _prod(dims) -> int | None:
    out = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        out *= d
    return out


def _same_dims(a, b) -> bool:
    """Equal shapes, comparing symbolic sizes by their expression."""
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def _drop_dims(nd: int, gone) -> dict[int, int | None]:
    """Where each of ``nd`` dims goes when the dims in ``gone`` disappear (None for those)."""
    where, k = {}, 0
    for i in range(nd):
        where[i] = None if i in gone else k
        k += i not in gone
    return where


def _first_of(node: fx.Node, lay):
    """``lay``, or (lay, None, ...) for ops that also return statistics or indices (which carry no channels)."""
    val = node.meta.get("val")
    return (lay,) + (None,) * (len(val) - 1) if isinstance(val, (tuple, list)) else lay


def _norm_params(node: fx.Node, st, args, what: str) -> list[tuple[str, int]] | str:
    """The per-channel parameters of a normalisation at ``args`` (dim 0), or why they cannot be sliced."""
    params = []
    for i in args:
        if i < len(node.args) and node.args[i] is not None:
            target = st.param(node.args[i])
            if target is None:
                return f"{what} with computed (non-parameter) weights"
            params.append((target, 0))
    return params


def _tuple_of(node: fx.Node, lay):
    """``lay`` for every tensor of a tuple-valued node."""
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return tuple(lay if isinstance(v, torch.Tensor) else None for v in val)
    return lay


class Elementwise:
    """y[c] = f(x[c]): the output keeps the input's channels."""

    follows_order = True

    def __call__(self, node: fx.Node, st) -> Layout | None:
        return _tuple_of(node, st.layout(node.args[0]))


class Softmax:
    """softmax(x, dim): elementwise unless dim is the channel axis (the output then depends on every channel)."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        lay, nd = st.layout(node.args[0]), _ndim(st, node.args[0])
        if lay is None or nd is None:
            return None
        if _dim(node.args[1], nd) == _pos(lay.axis, nd):
            return st.opaque(f"{node.target} over the channel axis")
        return lay


JOINS = {**dict.fromkeys((aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor), "sum"),
         **dict.fromkeys((aten.mul.Tensor, aten.mul_.Tensor, aten.div.Tensor, aten.div_.Tensor), "product")}


class Broadcast:
    """Elementwise ops with broadcasting: every tensor input holds the same channels.

    An input with one channel (or size 1 on the channel axis) is broadcast. A parameter with the channel count on
    the aligned axis is carried (sliced), also when it comes through ``expand`` or a dtype cast; any other input
    that is not tracked but spans the channels pins them: it could not be sliced.
    """

    follows_order = True

    def __call__(self, node: fx.Node, st) -> Layout | None:
        tensors = [a for a in node.args if isinstance(a, fx.Node) and st.shape(a) is not None]
        layouts = [st.layout(a) for a in tensors]
        tracked = [lay for lay in layouts if lay is not None and lay.length * lay.inner > 1]
        if not tracked:
            if any(lay is not None for lay in layouts):  # one channel broadcast against constants
                return st.fresh(node, f"{node.target} of a single channel with constants at {st.where()}")
            return None
        out = st.tie(tracked)
        if len(tracked) > 1:
            for seg in out.segments:
                st.spaces.mark_join(seg.space, JOINS.get(node.target, "other"))
        params = []
        for a, lay in zip(tensors, layouts):
            if lay is not None:
                continue
            shape = st.shape(a)
            if len(shape) < -out.axis or shape[out.axis] == 1:
                continue
            found = st.param_chain(a, out.axis)
            if found and shape[out.axis] == out.length * out.inner and out.inner == 1:
                params.append(found[:2])
                _carry_chain(st, out, found)
            else:
                st.pin(out, f"{a.name} of shape {list(shape)} spans the channels but is computed, not a parameter, "
                       f"at {st.where()}")
        st.carrier(out, params)
        return out


def _carry_chain(st, out: Layout, found) -> None:
    """Literal sizes of the channel dim in the expands and views a parameter passes through follow the kept width."""
    _, _, chain = found
    for n, pos in chain:
        sizes = n.args[1] if len(n.args) > 1 else None
        if n.target in (aten.expand.default, aten.view.default, aten.reshape.default) and isinstance(sizes, list):
            if pos < len(sizes) and isinstance(sizes[pos], int) and sizes[pos] != -1:
                st.carrier(replace(out, inner=1), [], size_args=[(1, pos, 1)], node=n)


class Spatial:
    """Ops acting on the last ``dims`` axes only (pooling, interpolation): channels pass through."""

    follows_order = True

    def __init__(self, dims: int = 2):
        self.dims = dims

    def __call__(self, node: fx.Node, st) -> Layout | None:
        lay = st.layout(node.args[0])
        if lay is None:
            return None
        if any(-a <= self.dims for a in lay.axes()) or lay.inner != 1:
            return st.opaque(f"{node.target} acts on the channel axis")
        return _first_of(node, lay)


class BatchNorm:
    """BatchNorm (eval): channel axis 1, per-channel parameters at the given argument positions."""

    follows_order = True

    def __init__(self, param_args: tuple[int, ...]):
        self.param_args = param_args

    def __call__(self, node: fx.Node, st) -> Layout | None:
        lay = st.layout(node.args[0])
        ndim = _ndim(st, node.args[0])
        if lay is None or ndim is None or _pos(lay.axis, ndim) != 1 or lay.inner != 1 or lay.granule != 1:
            return st.opaque("batch norm whose channel axis is not the tracked one")
        params = _norm_params(node, st, self.param_args, "batch norm")
        if isinstance(params, str):
            return st.opaque(params)
        st.carrier(lay, params)
        return _first_of(node, lay)


class LayerNorm:
    """layer_norm(x, [C], g, b): normalises over the last axis, the channels: a lossy carrier."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        lay = st.layout(node.args[0])
        shape = node.args[1]
        if lay is None or lay.axis != -1 or lay.inner != 1 or lay.granule != 1 or len(shape) != 1:
            return st.opaque("layer norm over more than the channel axis")
        params = _norm_params(node, st, (2, 3), "layer norm")
        if isinstance(params, str):
            return st.opaque(params)
        st.lossy(lay, "layer_norm normalises over the channels")
        st.carrier(lay, params, size_args=[(1, 0, 1)], lossy=True)
        return _first_of(node, lay)


class GroupNorm:
    """group_norm(x, G, g, b): statistics per block of C/G channels; keeping whole blocks keeps it exact."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        x, groups = node.args[0], node.args[1]
        lay, shape = st.layout(x), st.shape(x)
        if lay is None or shape is None or _pos(lay.axis, len(shape)) != 1 or lay.inner != 1 or lay.granule != 1:
            return st.opaque("group norm whose channel axis is not the tracked one")
        per = shape[1] // groups
        for seg, off in zip(lay.segments, lay.offsets()):
            if seg.size % per or off % per or not st.spaces.coarsen(seg.space, _unit_factor(st, seg.space, per)):
                return st.opaque(f"group norm blocks of {per} channels cross the tracked channels")
        params = _norm_params(node, st, (2, 3), "group norm")
        if isinstance(params, str):
            return st.opaque(params)
        st.carrier(lay, params, size_args=[(1, None, per)])
        return lay


def _unit_factor(st, space: int, multiple: int) -> int:
    """The factor that makes the space's unit a multiple of ``multiple``."""
    unit = st.spaces.unit(space)
    return math.lcm(unit, multiple) // unit


class Conv:
    """conv(x, W, b, stride, padding, dilation, groups): W is [C_out, C_in/groups, *kernel]; transposed convs have
    W as [C_in, C_out/groups, *kernel] (rows and columns swapped)."""

    follows_order = True

    groups_arg = 6

    def __init__(self, transposed: bool = False):
        self.transposed = transposed

    def __call__(self, node: fx.Node, st) -> Layout | None:
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        groups = node.args[self.groups_arg] if len(node.args) > self.groups_arg else 1
        weight, bias_t = st.param(w), st.param(bias)
        lay, shape, out_shape = st.layout(x), st.shape(x), st.shape(node)
        if weight is None or (bias is not None and bias_t is None):
            return st.opaque("convolution with computed (non-parameter) weights")
        axis = 1 - len(out_shape)
        rows, cols = (1, 0) if self.transposed else (0, 1)
        if lay is not None and (shape is None or _pos(lay.axis, len(shape)) != 1 or lay.inner != 1):
            st.pin(lay, f"a convolution runs over the axis these channels sit on at {st.where()}")
            lay = None  # its own input channels are not tracked: it only produces
        if groups == 1:
            if lay is not None:
                st.consumer("conv", weight, 0, lay, dim=cols)
            return st.producer("conv", weight, bias_t, out_shape, axis, dim=rows)
        if self.transposed or lay is None or lay.granule != 1:
            return st.opaque(f"grouped convolution (groups={groups}) on this input is kept whole")
        return self._grouped(node, st, lay, shape[1], out_shape, groups, weight, bias_t, axis)

    def _grouped(self, node, st, lay, c_in, out_shape, groups, weight, bias_t, axis):
        """Block j of the input (C_in/G channels) goes with block j of the output (C_out/G): whole blocks are kept
        (a depthwise conv is the case C_in/G = 1)."""
        c_out = out_shape[1]
        per_in, per_out = c_in // groups, c_out // groups
        if lay.order is not None and not per_in == per_out == 1:
            return st.opaque(f"grouped convolution (groups={groups}) on shuffled channels")
        out = st.fresh(out_shape, axis=axis)
        sizes = [seg.size // per_in * per_out for seg in lay.segments]
        parts = st.spaces.split(out.segments[0].space, sizes) if len(sizes) > 1 else [out.segments[0].space]
        aligned = parts is not None and all(seg.size % per_in == 0 and off % per_in == 0 for seg, off in
                                            zip(lay.segments, lay.offsets()))
        if aligned:
            aligned = all(st.spaces.align(seg.space, per_in, p, per_out) for seg, p in zip(lay.segments, parts))
        if not aligned:
            return st.opaque(f"grouped convolution (groups={groups}) whose blocks cross the tracked channels")
        out = Layout(axis, tuple(Segment(p, st.spaces.sizes[p]) for p in parts), order=lay.order)
        params = [(weight, 0)] + ([(bias_t, 0)] if bias_t else [])
        st.carrier(out, params, size_args=[(self.groups_arg, None, per_out)])
        return out


class Linear:
    """linear(x, W, b): W is [out, in]; x's last axis holds the channels (``inner`` elements each)."""

    follows_order = True

    def __call__(self, node: fx.Node, st) -> Layout | None:
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        weight, bias_t = st.param(w), st.param(bias)
        lay, out_shape = st.layout(x), st.shape(node)
        if weight is None:
            return st.opaque("linear with computed (non-parameter) weights")
        if lay is not None and -1 not in lay.axes():
            return lay  # acts on a dim without channels (token mixing): channels pass through
        if lay is not None and (lay.axis != -1):
            return st.opaque("linear over the dims inside a granule")
        if lay is not None:
            st.consumer("linear", weight, 0, lay)
        out = st.producer("linear", weight, bias_t, out_shape, -1)
        if bias is not None and bias_t is None:  # a bias computed at run time cannot be sliced: keep the outputs
            st.pin(out, f"linear with a computed bias {getattr(bias, 'name', bias)} at {st.where()}")
        return out


class Embedding:
    """embedding(W, ids): row ids of W; the output's channels are W's columns."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        weight = st.param(node.args[0])
        if weight is None:
            return st.opaque("embedding with a computed table")
        return st.producer("embedding", weight, None, st.shape(node), -1, dim=1)


def reshape_layout(st, lay: Layout, src: tuple, dst: tuple) -> Layout | str:
    """The layout after reshaping ``src`` to ``dst``, or why the channels cannot be followed."""
    nd_s, nd_d = len(src), len(dst)
    first = min(_pos(a, nd_s) for a in lay.axes())
    if nd_d >= nd_s - first and _same_dims(src[first:], dst[nd_d - (nd_s - first):]):
        return lay  # only dims before the channels change (window partitions, batch merges)
    if lay.order is not None:  # fine where every index of the channel axis stays one index (dims merge around it)
        out = reshape_layout(st, replace(lay, order=None), src, dst)
        if (isinstance(out, Layout) and out.length == lay.length and out.granule == 1 and not out.split
                and out.seg_axis is None and not out.outer):
            return replace(out, order=lay.order)
        return "reshape of channels in a channel shuffle's order"
    p = _pos(lay.axis, nd_s)
    back = _segments_back_to_back(lay, src, dst, p) if lay.seg_axis is not None else None
    if back is not None:
        return back
    if lay.outer:
        return _heads_out_of_batch(lay, src, dst, p)
    heads = _heads_into_batch(st, lay, src, dst, p)
    if heads is not None:
        return heads
    after = _prod(src[p + 1 :])
    if after is None or not isinstance(src[p], int):
        return "reshape over dynamic sizes next to the channels"
    split = {_pos(a, nd_s) for a in lay.split}
    for q in range(nd_d):
        if not isinstance(dst[q], int) or _prod(dst[q + 1 :]) is None:
            continue
        tail = _prod(dst[q + 1 :])
        if dst[q] == src[p] and tail == after and not split:
            return lay.with_axis(q - nd_d)  # the channel axis keeps its size; the dims after it regroup
        if dst[q] == src[p] and tail == after:
            inside = _regrouped_granules(lay, src, dst, p, q)
            if inside is not None:
                return replace(lay, axis=q - nd_d, split=inside)
        for j in range(1, nd_s - p):  # merge the channel axis with the j dims after it
            merged = _prod(src[p + 1 : p + 1 + j])
            if dst[q] != src[p] * merged or tail != _prod(src[p + 1 + j :]):
                continue
            inside = set(range(p + 1, p + 1 + j))
            if split and split == inside and merged == lay.granule and lay.inner == 1:
                return Layout(q - nd_d, lay.segments)  # [.., H, D] -> [.., H*D]: channels are contiguous again
            if not split or (not split & inside and all(a > p + j for a in split)
                             and _same_dims(src[p + 1 + j :], dst[q + 1 :])):
                return replace(lay, axis=q - nd_d, inner=lay.inner * merged)  # [.., Hkv, r, T, D] -> [.., Hkv*r, ..]
        for j in range(1, p + 1):  # merge the channel axis, innermost, with the j dims before it: repeated segments
            outer = _prod(src[p - j : p])
            if outer is None or dst[q] != outer * src[p] or tail != after or lay.inner != 1 or lay.granule != 1:
                continue
            if split or lay.seg_axis is not None or q < p - j or not _same_dims(src[: p - j], dst[: p - j]):
                continue
            return replace(lay, axis=q - nd_d, segments=lay.segments * outer)  # [.., 2, 2, C] -> [.., 4C]
        for j in range(1, nd_d - q):  # split the channel axis into dst[q], ..., dst[q+j]
            factors = dst[q : q + j + 1]
            if _prod(factors) != src[p] or _prod(dst[q + j + 1 :]) != after or split:
                continue
            if lay.inner > 1 and lay.granule == 1 and factors[0] == lay.length and _prod(factors[1:]) == lay.inner:
                return replace(lay, axis=q - nd_d, inner=1)  # [N, C*H*W] -> [N, C, H, W]
            if lay.inner != 1 or lay.granule != 1:
                continue
            if len(lay.segments) == 1 and _feeds_unbind(st.node, q):
                return _stacked(st, lay, factors, q - nd_d)
            if st.value_dims and j == 1 and len(lay.segments) == 1 and _feeds_value(st.node, q):
                return _value_dims(st, lay, factors, q + 1 - nd_d)
            return _granules(st, lay, _prod(factors[1:]), q - nd_d, tuple(range(q + 1 - nd_d, q + j + 1 - nd_d)))
    return "reshape that splits or mixes the channel axis"


def _regrouped_granules(lay: Layout, src: tuple, dst: tuple, p: int, q: int) -> tuple[int, ...] | None:
    """The within-granule axes after a reshape that regroups only within-granule dims, as an interleaved rotary
    embedding does inside each head (``[.., H, T, D/2, 2] -> [.., H, T, D]``): the dims between the channel axis and
    the first within-granule axis stay as they are, and every dim from there on is a within-granule axis. None for
    any other reshape."""
    if lay.inner != 1 or lay.seg_axis is not None or lay.outer:
        return None
    nd_s, nd_d = len(src), len(dst)
    split = {_pos(a, nd_s) for a in lay.split}
    first = min(split)
    gap = first - p - 1
    if gap < 0 or split != set(range(first, nd_s)) or not _same_dims(src[p + 1 : first], dst[q + 1 : q + 1 + gap]):
        return None
    return tuple(a - nd_d for a in range(q + 1 + gap, nd_d))


SHUFFLE_ENDS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def channel_shuffle(node: fx.Node, st, lay: Layout, src: tuple, dst: tuple) -> bool:
    """ShuffleNet's channel shuffle: ``view`` [.., C, ..] -> [.., g, C/g, ..], ``transpose`` of those two dims,
    (``contiguous``), ``view`` back to [.., C, ..]. Output index ``j = c*g + i`` holds input index ``i*C/g + c``: an
    index map, so the output's layout gets an ``order`` (the input's channels rearranged, no channel tied to
    another) and the rewrite replaces the three ops by one gather of the kept channels. Settles the last view's
    layout and returns True when ``node`` (the first view) starts such a pattern."""
    p = _pos(lay.axis, len(src))
    if (lay.granule != 1 or lay.inner != 1 or lay.split or lay.seg_axis is not None or lay.outer
            or len(dst) != len(src) + 1 or not isinstance(src[p], int) or not isinstance(dst[p], int)
            or dst[p] * dst[p + 1] != src[p] or not _same_dims(src[:p], dst[:p])
            or not _same_dims(src[p + 1 :], dst[p + 2 :])):
        return False
    transpose = _only_user(node)
    last = _only_user(transpose) if transpose is not None else None
    if last is not None and last.target in (aten.contiguous.default, aten.clone.default):
        last = _only_user(last)
    if (transpose is None or last is None or transpose.target != aten.transpose.int
            or {_dim(d, len(dst)) for d in transpose.args[1:3]} != {p, p + 1}):
        return False
    if last.target not in SHUFFLE_ENDS or not _same_dims(tensor_dims(last), src):
        return False
    g, per = dst[p], dst[p + 1]
    before = lay.order if lay.order is not None else tuple(range(src[p]))
    order = tuple(before[(j % g) * per + j // g] for j in range(src[p]))
    out = replace(lay, order=None if order == tuple(range(src[p])) else order)
    st.settled[last] = out
    st.carrier(out, [], tag="shuffle", node=last, source=lay)
    return True


def _segments_back_to_back(lay: Layout, src: tuple, dst: tuple, p: int) -> Layout | None:
    """[.., S, C] -> [.., S*C] with the segments on axis S: they follow each other along the merged axis (the
    heads of a value-dims layout back to [.., H*Dv])."""
    s = _pos(lay.seg_axis, len(src))
    if s == p - 1 and not lay.split and lay.inner == 1 and lay.granule == 1:
        for q in range(len(dst)):
            if (dst[q] == src[s] * src[p] and _same_dims(src[:s], dst[:q])
                    and _same_dims(src[p + 1 :], dst[q + 1 :])):
                return Layout(q - len(dst), lay.segments)
    return None


def _value_dims(st, lay: Layout, factors, axis: int) -> Layout | str:
    """[.., H*D] -> [.., H, D] for an attention's value: the within-head channels are the group (the same value
    dims kept in every head, so the tensor stays rectangular) and the H heads are segments stacked on the head
    axis. The space splits into H parts tied channel by channel."""
    heads, d = factors
    seg = lay.segments[0]
    parts = st.spaces.split(seg.space, [d] * heads)
    if parts is None:
        return "value dims of heads whose channels are tied elsewhere"
    if not all(st.spaces.align(parts[0], 1, part, 1) for part in parts[1:]):
        return "value dims that do not line up across heads"
    return Layout(axis, tuple(Segment(part, d) for part in parts), seg_axis=axis - 1)


def _heads_into_batch(st, lay: Layout, src: tuple, dst: tuple, p: int) -> Layout | str | None:
    """[T, B, H*D] -> [T, B*H, D] (nn.MultiheadAttention): the heads join the batch axis as its inner factor."""
    if lay.granule != 1 or lay.inner != 1 or lay.split or lay.seg_axis is not None or p < 1 or len(dst) != len(src):
        return None
    d = dst[p]
    if not isinstance(d, int) or not isinstance(src[p], int) or src[p] % d or src[p] == d:
        return None
    if not (_same_dims(src[: p - 1], dst[: p - 1]) and _same_dims(src[p + 1 :], dst[p + 1 :])):
        return None
    if str(dst[p - 1]) != str(src[p - 1] * (src[p] // d)):
        return None
    out = _granules(st, lay, d, p - 1 - len(dst), (p - len(dst),))
    return replace(out, outer=True) if isinstance(out, Layout) else out


def _heads_out_of_batch(lay: Layout, src: tuple, dst: tuple, p: int) -> Layout | str:
    """[B*H, T, D] -> [B, H, T, D]: the heads leave the batch axis again."""
    for q in range(1, len(dst)):
        if dst[q] == lay.length and str(dst[q - 1] * dst[q]) == str(src[p]) and _same_dims(src[p + 1 :], dst[q + 1 :]):
            return replace(lay, axis=q - len(dst), outer=False)
    return "reshape of heads merged into the batch axis"


def _granules(st, lay: Layout, granule: int, axis: int, split: tuple[int, ...]) -> Layout | str:
    """Channels regrouped into granules of ``granule`` consecutive channels (heads of head_dim)."""
    for seg, off in zip(lay.segments, lay.offsets()):
        if seg.size % granule or off % granule:
            return f"reshape into blocks of {granule} that cross a concatenation of channels"
    for seg in lay.segments:
        if not st.spaces.coarsen(seg.space, _unit_factor(st, seg.space, granule)):
            return f"blocks of {granule} channels do not fit the tied channels"
    return Layout(axis, lay.segments, 1, granule, split)


def _follow(node: fx.Node, dim: int) -> tuple[fx.Node, int] | None:
    """Follow dim ``dim`` of ``node``'s output through a chain of single users that only move dims (permutes,
    transposes, unsqueezes, squeezes, copies): the last node of the chain and where the dim sits there (None when
    a squeeze removes it)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        nd = len(tensor_dims(node))
        if user.target == aten.permute.default:
            dim = [d % nd for d in user.args[1]].index(dim)
        elif user.target == aten.transpose.int:
            a, b = user.args[1] % nd, user.args[2] % nd
            dim = b if dim == a else a if dim == b else dim
        elif user.target == aten.unsqueeze.default:
            dim += user.args[1] % (nd + 1) <= dim
        elif user.target in (aten.squeeze.dim, aten.squeeze.dims):
            gone = user.args[1] if isinstance(user.args[1], (list, tuple)) else [user.args[1]]
            gone = {g % nd for g in gone if tensor_dims(node)[g % nd] == 1}
            if dim in gone:
                return None
            dim -= sum(g < dim for g in gone)
        elif user.target in (aten.contiguous.default, aten.clone.default):
            pass
        else:
            break
        node = user
    return node, dim


def _feeds_unbind(node: fx.Node, dim: int) -> bool:
    """True when dim ``dim`` of ``node``'s output is unbound or selected next (through permutes, transposes,
    unsqueezes, squeezes and copies only): a fused projection split into its parts (q, k, v)."""
    found = _follow(node, dim)
    if found is None:
        return False
    node, dim = found
    if len(node.users) == 1:
        user = next(iter(node.users))
        return user.target == aten.unbind.int and (user.args[1] if len(user.args) > 1 else 0) % len(
            tensor_dims(node)) == dim
    return len(node.users) > 1 and all(u.target == aten.select.int and u.args[1] % len(tensor_dims(node)) == dim
                                       for u in node.users)


def _feeds_value(node: fx.Node, dim: int) -> bool:
    """True when ``node``'s output, with its dim ``dim`` as the head axis, is the value of an attention (through
    dim moves and copies only) and is used nowhere else."""
    found = _follow(node, dim)
    if found is None or len(found[0].users) != 1:
        return False
    node, dim = found
    user = next(iter(node.users))
    nd = len(tensor_dims(node))
    return user.target in ATTENTION and len(user.args) > 2 and user.args[2] is node and dim == nd - 3 \
        and node not in user.args[:2]


def tensor_dims(node: fx.Node) -> tuple:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _stacked(st, lay: Layout, factors, seg_axis: int) -> Layout | str:
    """[.., S*H*D] -> [.., S, H, D] where the S slices are used apart: S parts of the space stacked on ``seg_axis``,
    each with H granules of D channels (kept alike in every part, so that the tensor stays rectangular)."""
    count, granule = factors[0], _prod(factors[2:])
    seg = lay.segments[0]
    parts = st.spaces.split(seg.space, [seg.size // count] * count)
    if parts is None:
        return "a fused projection whose channels are tied elsewhere"
    for p in parts:
        if not st.spaces.coarsen(p, _unit_factor(st, p, granule)) or not st.spaces.align(parts[0], 1, p, 1):
            return f"parts of a fused projection that do not split into blocks of {granule}"
    split = tuple(range(seg_axis + 2, seg_axis + len(factors)))
    return Layout(seg_axis + 1, tuple(Segment(p, seg.size // count) for p in parts), 1, granule, split, seg_axis)


class Reshape:
    """view/reshape/_unsafe_view (target sizes in arg 1), flatten (start, end), unflatten (dim, sizes),
    reshape_as/view_as (the shape of another tensor).

    A literal size of the channel axis in the target follows the kept width; a computed one pins."""

    follows_order = True

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, node: fx.Node, st) -> Layout | None:
        x = node.args[0]
        lay, src, dst = st.layout(x), st.shape(x), st.shape(node)
        if lay is None or src is None or dst is None:
            return None if lay is None else st.opaque("reshape of a tensor without shape")
        if self.kind == "view" and channel_shuffle(node, st, lay, src, dst):
            return None  # the shuffle's output layout is settled; the view and transpose inside it carry nothing
        out = reshape_layout(st, lay, src, dst)
        if isinstance(out, str):
            return st.opaque(out)
        q = _pos(out.axis, len(dst))
        if self.kind == "as":  # reshape_as(x, other): the sizes come from a tensor, which follows by itself
            return out
        if self.kind == "view":
            sizes, pos = node.args[1], q
        elif self.kind == "unflatten":
            sizes, pos = node.args[2], q - _dim(node.args[1], len(src))
        else:
            return out
        if isinstance(sizes, (list, tuple)) and 0 <= pos < len(sizes) and len(dst) == len(sizes) + (
            len(src) - 1 if self.kind == "unflatten" else 0
        ):
            size = sizes[pos]
            if isinstance(size, fx.Node) and out.outer and size.target == operator.mul:
                factor = [i for i, a in enumerate(size.args) if isinstance(a, int)]
                if factor and size.args[factor[0]] == out.length:  # batch * heads: the head count follows
                    st.carrier(out, [], size_args=[(factor[0], None, 1)], node=size)
                    return out
            if isinstance(size, fx.Node):
                return st.opaque("reshape with a computed channel size")
            if size != -1:
                st.carrier(out, [], size_args=[(1 if self.kind == "view" else 2, pos, 1)])
        return out


class Permute:
    """permute/transpose/unsqueeze/squeeze: the channel axes move with their dims."""

    follows_order = True

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, node: fx.Node, st) -> Layout | None:
        x = node.args[0]
        lay, src, dst = st.layout(x), st.shape(x), st.shape(node)
        if lay is None:
            return None
        nd, nd_out = len(src), len(dst)
        where = self.where(node, src, dst)
        if where is None:
            return st.opaque(f"{node.target} whose dims cannot be followed")
        out = lay.remap(nd, nd_out, where)
        return out if out is not None else st.opaque(f"{node.target} removes the channel axis")

    def where(self, node, src, dst) -> dict[int, int | None] | None:
        nd = len(src)
        if self.kind == "permute":
            return {d % nd: i for i, d in enumerate(node.args[1])}
        if self.kind == "transpose":
            a, b = _dim(node.args[1], nd), _dim(node.args[2], nd)
            where = {i: i for i in range(nd)}
            where[a], where[b] = b, a
            return where
        if self.kind == "t":
            return {0: 1, 1: 0} if nd == 2 else {0: 0}
        if self.kind == "unsqueeze":
            d = _dim(node.args[1], nd + 1)
            return {i: (i if i < d else i + 1) for i in range(nd)}
        # squeeze: drop size-1 dims (the given ones, or all)
        dims = node.args[1] if len(node.args) > 1 else None
        dims = list(range(nd)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
        gone = {_dim(d, nd) for d in dims if src[_dim(d, nd)] == 1}
        return _drop_dims(nd, gone) if nd - len(gone) == len(dst) else None


class Expand:
    """expand(x, sizes): broadcast dims of size 1; a literal channel size follows the kept width."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        lay = st.layout(node.args[0])
        if lay is None:
            return None
        sizes = node.args[1]
        q = len(sizes) + lay.axis
        if isinstance(sizes[q], fx.Node):
            return st.opaque("expand with a computed channel size")
        if sizes[q] != -1:
            st.carrier(lay, [], size_args=[(1, q, 1)])
        return lay


class Repeat:
    """repeat(x, reps): channels pass through when their axes are not repeated."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        lay = st.layout(node.args[0])
        if lay is None:
            return None
        reps = node.args[1]
        if any(reps[len(reps) + a] != 1 for a in lay.axes()):
            return st.opaque("repeat along the channel axis")
        return lay


class Select:
    """select(x, dim, i) / unbind(x, dim): another dim goes away; on a segment axis each output gets its segment
    (q, k and v of a fused projection). Selecting on the channel axis itself pins."""

    def __init__(self, unbind: bool = False):
        self.unbind = unbind

    def __call__(self, node: fx.Node, st):
        x = node.args[0]
        lay, src = st.layout(x), st.shape(x)
        if lay is None:
            return None
        nd = len(src)
        d = _dim(node.args[1] if len(node.args) > 1 else 0, nd)
        count = src[d] if self.unbind else 1
        where = _drop_dims(nd, {d})
        if lay.seg_axis is not None and d == _pos(lay.seg_axis, nd):
            picked = [replace(lay, segments=(s,), seg_axis=None).remap(nd, nd - 1, where) for s in lay.segments]
            return tuple(picked) if self.unbind else picked[node.args[2] % len(picked)]
        out = lay.remap(nd, nd - 1, where)
        if out is None:
            return st.opaque(f"{node.target} removes a channel axis")
        return tuple([out] * count) if self.unbind else out


class Slice:
    """slice(x, dim, start, end, step): on another dim (or inside granules) channels pass through. On the channel
    axis (step 1) the slices of one tensor, as a fused projection's q, k and v ranges, are a split: the bounds of
    every such slice of ``x`` cut its channels into consecutive parts (whole segments, or parts of one producer's
    space), each slice takes the parts in its range, and its start and end follow the kept widths before them."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        x = node.args[0]
        lay, src = st.layout(x), st.shape(x)
        if lay is None:
            return None
        nd = len(src)
        d = _dim(node.args[1] if len(node.args) > 1 else 0, nd)
        if d != _pos(lay.axis, nd) or _same_dims(src, st.shape(node)):
            return lay
        size = src[d]
        if (lay.inner != 1 or lay.granule != 1 or lay.order is not None or lay.seg_axis is not None or lay.outer
                or not isinstance(size, int)):
            return st.opaque("slice of the channel axis inside granules, stacked segments or of symbolic width")
        ranges = [_slice_range(u, d, nd, size) for u in x.users if u.target == node.target]
        here = _slice_range(node, d, nd, size)
        if here is None or any(r is None for r in ranges):
            return st.opaque("slice of the channel axis with a step or computed bounds")
        bounds = sorted({0, size, *(b for r in ranges for b in r)})
        parts = _cut(st, lay, bounds)
        if parts is None:
            return st.opaque("slice of the channel axis across tied channels (or inside one of several segments)")
        starts = [sum(seg.size for seg in parts[:i]) for i in range(len(parts))]
        start, end = here
        before = {b: tuple(seg.space for seg, at in zip(parts, starts) if at < b) for b in (start, end)}
        size_args = [(arg, None, 1, before[b]) for arg, b in ((2, start), (3, end))
                     if 0 < b < size and arg < len(node.args)]
        st.carrier(Layout(lay.axis, tuple(parts)), [], size_args=size_args)
        return Layout(lay.axis, tuple(seg for seg, at in zip(parts, starts) if start <= at < end))


def _slice_range(node: fx.Node, d: int, nd: int, size: int) -> tuple[int, int] | None:
    """[start, end) of a ``slice.Tensor`` on dim ``d`` with step 1 and constant bounds (clamped to ``size``), else
    None; a slice on another dim gives (0, size)."""
    args = list(node.args) + [None] * (5 - len(node.args))
    if _dim(args[1] if args[1] is not None else 0, nd) != d:
        return 0, size
    start, end, step = args[2], args[3], args[4]
    if not all(v is None or isinstance(v, int) for v in (start, end, step)) or step not in (None, 1):
        return None
    start, end = (0 if start is None else start), (size if end is None else end)
    start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
    return min(max(start, 0), size), min(max(end, 0), size)


def _cut(st, lay: Layout, bounds: list[int]) -> list[Segment] | None:
    """The segments of ``lay`` cut at ``bounds`` (channel positions): whole segments where every bound falls on a
    segment's edge, else the parts of its one segment (a space tied to no other: ``Spaces.split``)."""
    edges = [sum(seg.size for seg in lay.segments[:i]) for i in range(len(lay.segments) + 1)]
    if set(bounds) <= set(edges):
        return list(lay.segments)
    if len(lay.segments) != 1:
        return None
    sizes = [b - a for a, b in zip(bounds, bounds[1:]) if b > a]
    parts = st.spaces.split(lay.segments[0].space, sizes)
    return None if parts is None else [Segment(p, n) for p, n in zip(parts, sizes)]


class Index:
    """x[i0, i1, ...] with index tensors on leading dims: the trailing channel axes are untouched."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        lay, src = st.layout(node.args[0]), st.shape(node.args[0])
        if lay is None:
            return None
        indices = node.args[1]
        if any(_pos(a, len(src)) < len(indices) for a in lay.axes()):
            return st.opaque("indexing of the channel axis")
        return lay


class Split:
    """split/split_with_sizes/chunk: on the channel axis the outputs get consecutive channels (segments, or parts
    of one producer's space); on another dim every output keeps the layout."""

    follows_order = True

    def __call__(self, node: fx.Node, st):
        x = node.args[0]
        lay, src = st.layout(x), st.shape(x)
        if lay is None:
            return None
        nd = len(src)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        d = _dim(dim, nd)
        outs = [v for v in node.meta.get("val", ())]
        if d != _pos(lay.axis, nd):
            return tuple(lay for _ in outs)
        if lay.inner != 1 or lay.granule != 1 or lay.seg_axis is not None or lay.outer:
            return st.opaque("split of the channel axis inside granules or stacked segments")
        sizes = [int(v.shape[d]) for v in outs]
        if lay.order is not None:
            return _split_shuffled(st, lay, sizes)
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        parts = _cut(st, lay, bounds)
        if parts is not None:
            starts = [sum(seg.size for seg in parts[:i]) for i in range(len(parts))]
            pieces = [tuple(seg for seg, at in zip(parts, starts) if a <= at < b) for a, b in zip(bounds, bounds[1:])]
            st.carrier(Layout(lay.axis, tuple(parts)), [],
                       size_args=[(1, i, 1, tuple(seg.space for seg in piece)) for i, piece in enumerate(pieces)])
            return tuple(Layout(lay.axis, piece) for piece in pieces)
        return st.opaque("split of the channel axis across tied channels")


def _split_shuffled(st, lay: Layout, sizes: list[int]):
    """split/chunk of channels in a shuffle's order: each output takes the indices of its range. A segment whose
    channels fall into several outputs is split into parts, one per output (its channels must reach the outputs in
    consecutive runs, first to last), so that every output holds whole spaces again; the split sizes follow the
    kept channels of the parts each output holds."""
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    piece_at = [i for i, n in enumerate(sizes) for _ in range(n)]
    starts = [sum(s.size for s in lay.segments[:i]) for i in range(len(lay.segments))]
    pieces: list[list[Segment]] = [[] for _ in sizes]
    home = {}  # stacked channel -> (piece, index among the piece's segments, channel in that segment)
    for i, (seg, start) in enumerate(zip(lay.segments, starts)):
        of = [piece_at[p] for p in lay.seg_positions(i)]
        if of != sorted(of):
            return st.opaque("split of shuffled channels that do not leave their producer in consecutive runs")
        runs = [of.count(i) for i in dict.fromkeys(of)]
        parts = st.spaces.split(seg.space, runs) if len(runs) > 1 else [seg.space]
        if parts is None:
            return st.opaque("split of shuffled channels whose producer's channels are tied elsewhere")
        j = 0
        for part, run in zip(parts, runs):
            piece = of[j]
            for k in range(run):
                home[start + j + k] = (piece, len(pieces[piece]), k)
            pieces[piece].append(Segment(part, run))
            j += run
    outs = []
    for i in range(len(sizes)):
        first = [sum(s.size for s in pieces[i][:n]) for n in range(len(pieces[i]))]
        order = tuple(first[n] + k for _, n, k in (home[lay.order[p]] for p in range(bounds[i], bounds[i + 1])))
        outs.append(Layout(lay.axis, tuple(pieces[i]), order=None if order == tuple(range(len(order))) else order))
    st.carrier(lay, [], size_args=[(1, i, 1, tuple(s.space for s in pieces[i])) for i in range(len(sizes))])
    return tuple(outs)


class Concat:
    """cat(tensors, dim): on the channel axis the segments follow each other; inside granules (rotary halves) or
    on another dim the inputs are tied, and an untracked input there must be a parameter (class token)."""

    follows_order = True

    def __call__(self, node: fx.Node, st) -> Layout | None:
        tensors = node.args[0]
        ndim = _ndim(st, node)
        layouts = [st.layout(t) for t in tensors]
        tracked = [lay for lay in layouts if lay is not None]
        if not tracked or ndim is None:
            return None
        d = _dim(node.args[1] if len(node.args) > 1 else 0, ndim) - ndim
        first = tracked[0]
        if all(lay.axis == d for lay in tracked) and len(tracked) == len(layouts):
            segments = tuple(s for lay in tracked for s in lay.segments)
            if any(lay.order is not None for lay in tracked):
                if any(lay.granule != 1 or lay.seg_axis is not None for lay in tracked):
                    return st.opaque("concat of shuffled channels with heads or stacked segments")
                order, start = [], 0
                for lay in tracked:
                    order.extend(start + c for c in (lay.order if lay.order is not None else range(lay.size)))
                    start += lay.size
                return Layout(d, segments, order=tuple(order))
            if all(lay.inner == 1 and lay.granule == first.granule and lay.split == first.split for lay in tracked):
                return replace(first, segments=segments)
            return st.opaque("concat of channels laid out differently")
        if any(lay.axis == d for lay in tracked):
            return st.opaque("concat mixing the channel axis with another")
        out = st.tie(tracked)
        params = []
        for t, lay in zip(tensors, layouts):
            if lay is not None:
                continue
            shape = st.shape(t)
            if shape[out.axis] == 1:
                continue
            found = st.param_chain(t, out.axis)
            if found and out.inner == 1 and shape[out.axis] == out.length:
                params.append(found[:2])
                _carry_chain(st, out, found)
            else:
                st.pin(out, f"concat with the computed tensor {t.name} at {st.where()}")
        st.carrier(out, params)
        return out


class Stack:
    """stack(tensors, dim): a new dim in front of ``dim``; the inputs hold the same channels (tied). A new last dim
    after a last within-granule dim (``stack((-x2, x1), -1)`` in an interleaved rotary) is within the granule too."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        tensors = node.args[0]
        layouts = [st.layout(t) for t in tensors]
        if any(lay is None for lay in layouts):
            return st.opaque("stack with untracked tensors")
        nd = len(st.shape(tensors[0]))
        d = _dim(node.args[1] if len(node.args) > 1 else 0, nd + 1)
        out = st.tie(layouts).remap(nd, nd + 1, {i: (i if i < d else i + 1) for i in range(nd)})
        if out is not None and d == nd and out.split and -2 in out.split:
            out = replace(out, split=(*out.split, -1))  # a new last dim beside the last within-granule dim: inside it
        return out


class Reduce:
    """mean/sum/amax/var(x, dims, keepdim): channels pass through unless reduced over; a reduction over the
    channels kept as a size-1 axis is a normalisation statistic (RMSNorm): lossy."""

    follows_order = True

    def __call__(self, node: fx.Node, st) -> Layout | None:
        x = node.args[0]
        lay, shape = st.layout(x), st.shape(x)
        if lay is None:
            return None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        ndim = len(shape)
        if dims is None:
            return st.opaque("reduction over all axes")
        dims = {_dim(d, ndim) for d in ([dims] if isinstance(dims, int) else dims)}
        if _pos(lay.axis, ndim) in dims:
            if keepdim and lay.inner == 1 and lay.granule == 1:
                st.lossy(lay, f"{node.target} is a statistic over the channels")
                return None
            return st.opaque("reduction over the channel axis")
        kept = replace(lay, split=tuple(a for a in lay.split if _pos(a, ndim) not in dims))
        if keepdim:
            return kept
        return kept.remap(ndim, ndim - len(dims), _drop_dims(ndim, dims))


class Roll:
    """roll(x, shifts, dims): channels pass through when their axes are not rolled."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        lay, shape = st.layout(node.args[0]), st.shape(node.args[0])
        if lay is None:
            return None
        dims = node.args[2] if len(node.args) > 2 else []
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not dims or _pos(lay.axis, len(shape)) in {_dim(d, len(shape)) for d in dims}:
            return st.opaque("roll of the channel axis")
        return lay


class Attention:
    """scaled_dot_product_attention(q, k, v, mask): q, k, v as [.., H, T, D]. Head h of q goes with head h of k and
    v (head h // r under grouped-query attention, via ``enable_gqa`` or a repeat in the graph); the output's heads
    (a new space of H * D_v channels) with them. The softmax couples the channels inside a head, so heads are the
    unit; the output is linear in v per channel, so the consumer of the output is compensated."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        gqa = node.kwargs.get("enable_gqa", node.args[7] if len(node.args) > 7 else False)
        lq, lk, lv = st.layout(q), st.layout(k), st.layout(v)
        if st.value_dims:
            return self._value_dims(node, st, lq, lk, lv, mask, gqa)
        if any(lay is None or lay.axis != -3 or lay.granule == 1 or -1 not in lay.split for lay in (lq, lk, lv)):
            return st.opaque("attention over inputs without tracked heads")
        if _mask_per_head(st, mask):
            return st.opaque("attention mask per head")
        hq, hk = st.shape(q)[-3], st.shape(k)[-3]
        if gqa and hk != hq:
            lk = replace(lk, inner=lk.inner * hq // hk)
            lv = replace(lv, inner=lv.inner * hq // hk)
        if not (st.align(lq, lk) and st.align(lq, lv)):
            return st.opaque("attention heads of q, k and v that do not line up")
        out_shape = st.shape(node)
        dv = out_shape[-1]
        sid = st.spaces.new(hq * dv)
        st.spaces.coarsen(sid, dv)
        out = Layout(-3, (Segment(sid, hq * dv),), 1, dv, (-1,))
        if not st.align(lq, out):
            return st.opaque("attention output heads that do not line up")
        st.carrier(out, [], tag="attention")
        return out

    @staticmethod
    def _value_dims(node, st, lq, lk, lv, mask, gqa) -> Layout | None:
        """Value dims inside heads: out[h, t, d] = sum_s a[h, t, s] v[h, s, d] is v's channel (h, d) mixed over
        tokens only, so the output carries v's layout; q and k keep every head (the head count stays)."""
        if lq is not None and lk is not None and st.align(lq, lk):
            st.carrier(lq, [], tag="attention")
        reason = "heads are kept whole while their value dims are pruned (--targets vdims)"
        for lay in (lq, lk):
            st.pin(lay, f"{reason} at {st.where()}")
        why = None
        if lv is None or lv.seg_axis != -3 or lv.axis != -1:
            why = "value dims need a value projection of its own reshaped to heads (not fused with q and k)"
        elif gqa or st.shape(node.args[0])[-3] != st.shape(node.args[2])[-3]:
            why = "value dims under grouped-query attention"
        elif _mask_per_head(st, mask):
            why = "attention mask per head"
        if why:
            st.pin(lv, f"{why} at {st.where()}")
            return st.opaque(why)
        st.carrier(lv, [], tag="value_dims")
        return lv


def _mask_per_head(st, mask) -> bool:
    """An attention mask that differs between heads (it carries channels, or has a head axis of more than 1)."""
    if not isinstance(mask, fx.Node):
        return False
    shape = st.shape(mask)
    return st.layout(mask) is not None or bool(shape and len(shape) >= 3 and shape[-3] != 1)


class Matmul:
    """a @ b with batch dims: channels on batch axes are tied (heads of q k^T, then of attention @ v); channels on
    a's rows or b's columns pass through; contracting a channel axis pins (weights computed at run time)."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        a, b = node.args[:2]
        la, lb = st.layout(a), st.layout(b)
        sa, sb = st.shape(a), st.shape(b)
        if len(sa) < 2 or len(sb) < 2:
            return st.opaque("matmul of vectors")
        if (la is not None and la.axis == -1) or (lb is not None and lb.axis == -2):
            return st.opaque("matmul contracting the channel axis")
        contracted = (la is not None and -1 in la.split) or (lb is not None and -2 in lb.split)
        la = la and replace(la, split=tuple(s for s in la.split if s != -1))
        lb = lb and replace(lb, split=tuple(s for s in lb.split if s != -2))
        if la is not None and lb is not None:
            if la.axis > -3 or lb.axis > -3:
                return st.opaque("matmul of channels on different axes")
            if not (la.axis == lb.axis and st.align(la, lb)):
                return st.opaque("matmul of batch channels that do not line up")
            out = lb if lb.split else la
            if lb.split and lb.inner != la.inner:  # attention @ repeated v: the output's heads are a's (the queries')
                out = replace(la, split=lb.split)
        else:
            out = la if la is not None else lb
            other, so = (b, sb) if la is not None else (a, sa)
            if out.axis <= -3 and len(so) >= -out.axis and so[out.axis] != 1:
                return st.opaque(f"matmul with the computed tensor {other.name} across the channels")
        if contracted:
            st.carrier(out, [], tag="attention")
        return out


class Pad:
    """pad(x, [l, r, t, b, ...]): pads the last len/2 axes; channels pass through when their axes get no padding
    (a channels-last window padding pads [0, 0] on the channels)."""

    def __call__(self, node: fx.Node, st) -> Layout | None:
        lay = st.layout(node.args[0])
        if lay is None:
            return None
        pads = list(node.args[1])
        padded = {-(i // 2) - 1 for i, p in enumerate(pads) if p != 0}  # pads[2i:2i+2] pad dim -(i+1)
        if any(a in padded for a in lay.axes()) or (lay.inner != 1 and lay.axis >= -len(pads) // 2):
            return st.opaque("padding of the channel axis")
        return lay


class Getitem:
    """operator.getitem on a tuple of layouts."""

    follows_order = True

    def __call__(self, node: fx.Node, st) -> Layout | None:
        src, idx = node.args
        found = st.layouts.get(src)
        if isinstance(found, tuple) and isinstance(idx, int) and idx < len(found):
            lay = found[idx]
            return st.layout_of(lay) if isinstance(lay, Layout) else None
        return st.opaque("getitem on an untracked value")


SHAPE_ONLY = {aten.sym_size.int}
ASSERTIONS = {getattr(aten, name).default for name in ("_assert_tensor_metadata", "_assert_scalar")
              if hasattr(aten, name)}


def is_shape_only(node: fx.Node, st) -> bool:
    """Nodes that neither read nor produce channel data: shape queries, guards and assertions.

    ``sym_size`` of the channel axis would change after pruning, so it pins the tensor it reads.
    """
    if node.op == "call_module" and str(node.target).startswith("_guards"):
        return True
    if node.op != "call_function":
        return False
    if node.target in ASSERTIONS:
        return True
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
    dropout dropout_ native_dropout clone alias detach contiguous neg abs exp erf sqrt rsqrt reciprocal square
    feature_dropout alpha_dropout lift_fresh_copy _to_copy to.dtype to.dtype_layout to.device type_as cos sin log
    sign floor ceil round logical_not bitwise_not selu celu"""
BROADCAST = """add.Tensor add_.Tensor sub.Tensor sub_.Tensor mul.Tensor mul_.Tensor div.Tensor div_.Tensor
    add.Scalar add_.Scalar sub.Scalar mul.Scalar mul_.Scalar div.Scalar div_.Scalar pow.Tensor_Scalar pow.Tensor_Tensor
    rsub.Scalar rsub.Tensor clamp clamp_ clamp_min clamp_min_ clamp_max maximum minimum where.self
    masked_fill.Scalar masked_fill.Tensor addcmul lerp.Scalar eq.Tensor ne.Tensor lt.Tensor gt.Tensor
    eq.Scalar ne.Scalar lt.Scalar gt.Scalar ge.Scalar le.Scalar logical_and __and__.Tensor"""
SPATIAL_1D = """max_pool1d avg_pool1d adaptive_avg_pool1d adaptive_max_pool1d upsample_nearest1d.vec
    upsample_linear1d.vec"""
SPATIAL_2D = """max_pool2d avg_pool2d adaptive_avg_pool2d adaptive_max_pool2d upsample_nearest2d.vec
    upsample_bilinear2d.vec upsample_bicubic2d.vec _upsample_bilinear2d_aa.vec max_pool2d_with_indices"""
SPATIAL_3D = """max_pool3d avg_pool3d adaptive_avg_pool3d adaptive_max_pool3d upsample_nearest3d.vec
    upsample_trilinear3d.vec"""

OP_TABLE: dict = {
    **_rows(ELEMENTWISE, Elementwise()),
    **_rows(BROADCAST, Broadcast()),
    **_rows("_softmax softmax.int log_softmax.int _log_softmax", Softmax()),
    **_rows(SPATIAL_1D, Spatial(1)),
    **_rows(SPATIAL_2D, Spatial(2)),
    **_rows(SPATIAL_3D, Spatial(3)),
    **_rows("batch_norm _native_batch_norm_legit_no_training", BatchNorm((1, 2, 3, 4))),
    **_rows("layer_norm native_layer_norm", LayerNorm()),
    **_rows("group_norm", GroupNorm()),
    **_rows("conv1d conv2d conv3d", Conv()),
    **_rows("conv_transpose1d conv_transpose2d.input conv_transpose3d.input", Conv(transposed=True)),
    **_rows("linear", Linear()),
    **_rows("embedding", Embedding()),
    **_rows("view reshape _unsafe_view", Reshape("view")),
    **_rows("flatten.using_ints", Reshape("flatten")),
    **_rows("reshape_as view_as", Reshape("as")),
    **_rows("unflatten.int", Reshape("unflatten")),
    **_rows("permute", Permute("permute")),
    **_rows("transpose.int", Permute("transpose")),
    **_rows("t", Permute("t")),
    **_rows("unsqueeze", Permute("unsqueeze")),
    **_rows("squeeze squeeze.dim squeeze.dims", Permute("squeeze")),
    **_rows("expand", Expand()),
    **_rows("repeat", Repeat()),
    **_rows("select.int", Select()),
    **_rows("unbind.int", Select(unbind=True)),
    **_rows("slice.Tensor", Slice()),
    **_rows("index.Tensor", Index()),
    **_rows("split.Tensor split_with_sizes unsafe_split.Tensor chunk", Split()),
    **_rows("stack", Stack()),
    **_rows("cat concat", Concat()),
    **_rows("pad constant_pad_nd", Pad()),
    **_rows("mean.dim sum.dim_IntList amax amin var.correction var.dim std.correction std.dim", Reduce()),
    **_rows("roll", Roll()),
    **_rows("scaled_dot_product_attention", Attention()),
    **_rows("matmul bmm", Matmul()),
    operator.getitem: Getitem(),
}

ATTENTION = set(_rows("scaled_dot_product_attention", None))
SOURCES = set(_rows("conv1d conv2d conv3d conv_transpose1d conv_transpose2d.input conv_transpose3d.input linear "
                    "embedding", None))
