"""Weight surgery: the handlers that narrow producers and carriers and merge maps into consumers.

For the channel map of a space (kept channels K, or a fold; see :mod:`grailc.channel_map`):

* producer rows:   W' = R W, b' = R b (W[K], b[K] for a selection; R the channel map's merge)
* carrier slices:  p' = R p on the parameter's channel dim (BatchNorm statistics, depthwise filters; averaged
                   within a cluster for a fold, which is exact for the means and approximate for variances)
* consumer merge:  W'[:, k] = sum_c W[:, c] B[c, k] on the input-channel dim, for every kernel tap (conv) or
                   every position of a flattened input (linear after flatten, W viewed as [out, C, inner]);
                   without compensation B = U (I[:, K] for a selection: plain column slicing).
* consumer bias:   b' = b + sum_c Wsum[:, c] c_c for an input offset c, Wsum the columns summed over flattened
                   positions and kernel taps (each tap weighted by the fraction of positions where it reads the
                   input, not zero padding: the mean output change); a consumer without a bias gets one.

Along a multi-segment axis (after a concat) the maps of the segments stack block-diagonally; after a channel
shuffle each segment's indices are listed (``Layout.order``) and the kept ones stay in their relative order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from grailc.channel_map import ChannelMap
from grailc.channels import Layout, take
from grailc.errors import GrailcError


def get_param(gm: fx.GraphModule, target: str) -> torch.Tensor:
    return gm.get_parameter(target) if is_parameter(gm, target) else gm.get_buffer(target)


def owner_of(module: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    """The submodule that holds attribute ``target`` (a dotted name) and the attribute's own name."""
    owner_name, _, name = target.rpartition(".")
    return (module.get_submodule(owner_name) if owner_name else module), name


def set_param(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer, keeping its kind and memory format, with that format's plain strides: a
    product can leave a 1 x 1 kernel's [O, C, 1, 1] weight strided as (C, 1, C, C), which a convolution reads as
    channels-last, and every tensor after it would then be channels-last (the ONNX export gathers the flattened
    classifier input through Shape, Range and Gather)."""
    owner, name = owner_of(gm, target)
    value = value.detach().clone(memory_format=memory_format_of(getattr(owner, name, None)))
    if is_parameter(gm, target):
        setattr(owner, name, torch.nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(name, value)


def memory_format_of(t: torch.Tensor | None) -> torch.memory_format:
    """channels-last where ``t`` is laid out so and not also plainly contiguous (a 1 x 1 kernel can be both),
    else the plain contiguous format."""
    if t is not None and not t.is_contiguous():
        for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
            if t.dim() == dims and t.is_contiguous(memory_format=fmt):
                return fmt
    return torch.contiguous_format


def is_parameter(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def segment_maps(layout: Layout, maps_of) -> list[ChannelMap]:
    """The channel map of each segment over its indices along ``layout.axis``. ``maps_of(space)`` gives (map of
    the group's units, channels per unit) for a decided space, None otherwise; a unit of ``u`` channels covers
    ``u / granule`` indices. Segments stacked on a segment axis share their indices (they are tied), so the first
    one says which."""
    maps = []
    segments = layout.segments[:1] if layout.seg_axis is not None else layout.segments
    for seg in segments:
        found = maps_of(seg.space)
        if found is None or found[1] < layout.granule:
            maps.append(ChannelMap.identity(layout.seg_length(seg)))
        else:
            maps.append(found[0].per_index(found[1] // layout.granule))
    return maps


def narrowed_indices(layout: Layout, maps: list[ChannelMap]) -> list[torch.Tensor]:
    """Where the compressed tensor holds each segment's new channels, in the order of its map: segment after
    segment; with an order (after a channel shuffle), the kept channels keep the relative order of their indices
    and the indices a segment keeps take its kept channels in the map's order (a selection only: a fold has no
    index to keep)."""
    if layout.order is None:
        starts = [sum(m.k for m in maps[:i]) for i in range(len(maps))]
        return [torch.arange(start, start + m.k) for start, m in zip(starts, maps)]
    if not all(m.is_selection for m in maps):
        raise GrailcError("a fold cannot merge channels that a channel shuffle spreads apart",
                          fix="select channels in these groups (any selector but fold)")
    held = [torch.tensor(layout.seg_positions(i))[m.keep].sort().values for i, m in enumerate(maps)]
    rank = torch.full((layout.length,), -1, dtype=torch.long)
    every = torch.cat(held).sort().values
    rank[every] = torch.arange(len(every))
    return [rank[h] for h in held]


def layout_map(layout: Layout, maps_of) -> ChannelMap:
    """The channel map along ``layout.axis`` (see :func:`segment_maps`): the segments' maps stacked
    block-diagonally, or, after a channel shuffle, the selection that puts each kept index where
    :func:`narrowed_indices` says."""
    maps = segment_maps(layout, maps_of)
    if layout.order is None:
        return ChannelMap.stack(maps)
    keep = torch.empty(sum(m.k for m in maps), dtype=torch.long)
    for i, (m, where) in enumerate(zip(maps, narrowed_indices(layout, maps))):
        keep[where] = torch.tensor(layout.seg_positions(i))[m.keep]
    return ChannelMap.select(keep, layout.length)


def map_tensor(x: torch.Tensor, layout: Layout, maps_of) -> torch.Tensor:
    """A tensor of the dense model as the compressed model holds it: its channels along ``layout.axis`` kept or
    merged by the channel map (a flattened axis of ``inner`` positions per channel is mapped per position)."""
    axis = x.dim() + layout.axis
    cmap = layout_map(layout, maps_of)
    if layout.inner == 1:
        return cmap.rows(x, axis)
    y = cmap.rows(x.unflatten(axis, (layout.length, layout.inner)), axis)
    return y.flatten(axis, axis + 1)


def merge_columns(weight: torch.Tensor, layout: Layout, maps: list[torch.Tensor], targets: list[torch.Tensor],
                  dim: int = 1) -> torch.Tensor:
    """One map per segment on dim ``dim`` (the input channels) of a consumer weight: the new columns
    ``targets[s]`` (see :func:`narrowed_indices`) become ``W[:, segment s] @ maps[s]``.

    ``maps[s]`` is a [size_s, k_s] matrix (a GRAIL map), or a 1-D index of kept columns (plain pruning, I[:, K]).
    """
    if dim == 0:  # transposed convolution: [C_in, C_out, ...]
        return merge_columns(weight.transpose(0, 1), layout, maps, targets).transpose(0, 1).contiguous()
    out_dim = weight.shape[0]
    w = weight.reshape(out_dim, layout.length, layout.inner, -1)  # [O, C, inner, taps]
    pieces = []
    for i, (seg, off, m) in enumerate(zip(layout.segments, layout.offsets(), maps)):
        positions = layout.seg_positions(i) if layout.order is not None else None
        pieces.append(map_columns(take(w, 1, off, layout.seg_length(seg), positions), m))
    if layout.order is None:
        merged = torch.cat(pieces, dim=1)
    else:
        merged = w.new_zeros(out_dim, sum(len(t) for t in targets), *w.shape[2:])
        for piece, where in zip(pieces, targets):
            merged[:, where.to(w.device)] = piece
    k_total = merged.shape[1]
    if weight.dim() == 2:
        return merged.reshape(out_dim, k_total * layout.inner)
    return merged.reshape(out_dim, k_total, *weight.shape[2:])


@dataclass(frozen=True)
class NewColumns:
    """A consumer slot's new columns themselves, [O, k * taps] (solved over kernel taps, not merged from a map)."""

    columns: torch.Tensor


def map_columns(cols: torch.Tensor, m, dtype=torch.float64) -> torch.Tensor:
    """[O, C, inner, taps] columns through a map on C: a 1-D index keeps columns, a [C, k] matrix merges them
    (in ``dtype``); ``NewColumns`` replace them ([O, k, inner, taps])."""
    if isinstance(m, NewColumns):
        return m.columns.reshape(cols.shape[0], -1, *cols.shape[2:]).to(cols.device, cols.dtype)
    if m.dim() == 1:
        return cols.index_select(1, m.to(cols.device))
    return torch.einsum("ocit,ck->okit", cols.to(dtype), m.to(cols.device, dtype)).to(cols.dtype)


def fold_map(fold, cmap: ChannelMap):
    """What a consumer slot's columns go through (``map_columns``): its compensation, else plain pruning."""
    if fold is None or fold.B is None:
        return cmap.columns()
    return NewColumns(fold.B) if fold.columns else fold.B


def fold_shift(gm: fx.GraphModule, consumer, weight: torch.Tensor, index: torch.Tensor, fold) -> torch.Tensor:
    """[O] float64: the consumer's bias shift for a compensation with an offset: W c (``offset_shift``), or the
    shift itself where it was solved in the output space (``fold.columns``)."""
    if fold.columns:
        return fold.offset.to("cpu", torch.float64)
    return offset_shift(gm, consumer, weight, index, fold.offset)


def mask_columns(weight: torch.Tensor, slot, cmap: ChannelMap, fold) -> torch.Tensor:
    """Full-width twin of a merge: the consumer reads the old channels x, the compressed one z = R x, so the slot's
    columns become W B R (W[:, K] B on K and 0 elsewhere for a selection; no fold or no B: the map's plain spread
    U; new columns where the fold has them, see ``fold_map``). For the shadow of sequential calibration, so merged
    in float32 (``apply`` merges in float64)."""
    layout = slot.consumer.layout
    w = _columns_first(weight, slot).detach().clone(memory_format=torch.contiguous_format)
    view = w.view(w.shape[0], layout.length, layout.inner, -1)
    cols = slot.take(view)
    work = torch.promote_types(cols.dtype, torch.float32)
    narrowed = map_columns(cols, fold_map(fold, cmap), work)  # [O, k, inner, taps]
    if cmap.is_selection:
        masked = torch.zeros_like(cols)
        masked[:, cmap.keep.to(cols.device)] = narrowed
    else:
        masked = map_columns(narrowed, cmap.merge, work)
    view[:, slot.indices().to(view.device)] = masked
    return _columns_first(w, slot).contiguous()


NARROW_BELOW = 0.9  # ``narrow_inputs`` gathers a consumer's input only where it reads less than this fraction


def narrow_inputs(gm: fx.GraphModule, consumer) -> fx.Node | None:
    """Make a conv/linear node read only the input channels its weight has non-zero columns for:
    y = op(index_select(x, axis, L), W[:, L], ...), which computes what op(x, W, ...) computes (the columns
    outside L are zero). For the shadow of sequential calibration, whose masked columns (``mask_columns``) are
    zero outside the kept channels: its consumers then cost what the compressed model's do. The weight keeps its
    node; the narrowed copy and L are new attributes. Returns the first node inserted (where a run stopped before
    the consumer goes on), or None where nothing is narrowed (fewer than 1 - ``NARROW_BELOW`` of the columns are
    zero, or the weight is not the node's argument 1)."""
    node = next(n for n in gm.graph.nodes if n.name == consumer.node)
    w_node = node.args[1] if len(node.args) > 1 else None
    if not isinstance(w_node, fx.Node) or w_node.op != "get_attr" or w_node.target != consumer.weight:
        return None
    weight = get_param(gm, consumer.weight)
    live = weight.detach().ne(0).movedim(consumer.dim, 0).flatten(1).any(1).nonzero().flatten()
    if live.numel() >= NARROW_BELOW * weight.shape[consumer.dim]:
        return None
    name = f"_narrowed_{node.name}"
    gm.register_buffer(name + "_index", live)
    gm.register_buffer(name + "_weight", weight.detach().index_select(consumer.dim, live))
    with gm.graph.inserting_before(node):
        index = gm.graph.get_attr(name + "_index")
        x = gm.graph.call_function(torch.ops.aten.index_select.default,
                                   (node.args[consumer.arg], consumer.layout.axis, index))
        narrowed = gm.graph.get_attr(name + "_weight")
    args = list(node.args)
    args[consumer.arg], args[1] = x, narrowed
    node.args = tuple(args)
    return index


def _columns_first(weight: torch.Tensor, slot) -> torch.Tensor:
    """The weight with its input channels on dim 1 (a transposed convolution has them on dim 0); an involution."""
    return weight.transpose(0, 1) if slot.consumer.dim == 0 else weight


def consumer_columns(weight: torch.Tensor, slot, dtype=torch.float64) -> torch.Tensor:
    """The slot's columns of a consumer weight as [rows, size] (every kernel tap / flattened position a row), on the
    CPU, where scores and solves are computed from the (CPU) statistics whatever device the model runs on."""
    layout = slot.consumer.layout
    weight = _columns_first(weight, slot)
    w = slot.take(weight.detach().reshape(weight.shape[0], layout.length, -1))
    return w.permute(0, 2, 1).reshape(-1, slot.size).to("cpu", dtype)


def takes_bias(gm: fx.GraphModule, consumer) -> bool:
    """Whether an input offset can move into the consumer's bias: a conv or linear (not transposed) whose bias
    (argument 2) is absent or a parameter."""
    node = next((n for n in gm.graph.nodes if n.name == consumer.node), None)
    if node is None or consumer.dim != 1 or consumer.kind not in ("conv", "linear"):
        return False
    bias = node.args[2] if len(node.args) > 2 else None
    return bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr")


def offset_shift(gm: fx.GraphModule, consumer, weight: torch.Tensor, index: torch.Tensor,
                 c: torch.Tensor) -> torch.Tensor:
    """[O] float64: the mean output change of the consumer when its input channels ``index`` move by the constant
    c: W[:, index] summed over flattened positions and over kernel taps, each tap weighted by the fraction of
    output positions where it reads the input rather than zero padding."""
    w = weight.detach().reshape(weight.shape[0], consumer.layout.length, -1)
    w = w.index_select(1, index.to(w.device))
    w = w.to("cpu", torch.float64)  # with c and the coverage, which live on the CPU
    coverage = tap_coverage(gm, consumer) if consumer.kind == "conv" else None
    if coverage is not None and coverage.numel() == w.shape[-1]:
        w = w * coverage
    return w.sum(-1) @ c.to("cpu", torch.float64)


def tap_coverage(gm: fx.GraphModule, consumer) -> torch.Tensor | None:
    """[taps] float64: per kernel tap of a zero-padded conv, the fraction of output positions at which the tap
    reads the input; None when the sizes are not known integers."""
    node = next(n for n in gm.graph.nodes if n.name == consumer.node)
    x, y = node.args[0].meta.get("val"), node.meta.get("val")
    kernel = get_param(gm, consumer.weight).shape[2:]
    dims = len(kernel)

    def per_dim(i, default):
        v = node.args[i] if len(node.args) > i else default
        return list(v) * (dims // len(v)) if isinstance(v, (list, tuple)) else [v] * dims

    stride, padding, dilation = per_dim(3, 1), per_dim(4, 0), per_dim(5, 1)
    try:
        sizes = [(int(i), int(o)) for i, o in zip(x.shape[-dims:], y.shape[-dims:])]
    except (AttributeError, TypeError):
        return None
    if not all(isinstance(v, int) for v in stride + padding + dilation):
        return None
    coverage = torch.ones((), dtype=torch.float64)
    for k, (i_len, o_len), s, p, d in zip(kernel, sizes, stride, padding, dilation):
        pos = torch.arange(o_len)[:, None] * s - p + torch.arange(k)[None, :] * d  # [out, k] input index read
        coverage = coverage[..., None] * ((pos >= 0) & (pos < i_len)).to(torch.float64).mean(0)
    return coverage.reshape(-1)


def bias_of(gm: fx.GraphModule, node_name: str) -> str | None:
    """The target of a conv/linear node's bias parameter (argument 2), None without one."""
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    bias = node.args[2] if len(node.args) > 2 else None
    return bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr" else None


def add_to_bias(gm: fx.GraphModule, consumer, shift: torch.Tensor) -> bool:
    """b += shift on the consumer's conv/linear node (bias = argument 2); without a bias, a new parameter beside
    the weight (``<module>.bias``) and its get_attr node are added. True when the graph gained that node (then
    ``gm.recompile()`` before calling ``gm`` itself; an ``fx.Interpreter`` reads the graph as it is)."""
    node = next(n for n in gm.graph.nodes if n.name == consumer.node)
    bias = node.args[2] if len(node.args) > 2 else None
    if bias is not None:
        b = get_param(gm, bias.target)
        set_param(gm, bias.target, b + shift.to(b.device, b.dtype))
        return False
    weight = get_param(gm, consumer.weight)
    owner_name = consumer.weight.rpartition(".")[0]
    owner = gm.get_submodule(owner_name) if owner_name else gm
    name = "bias"
    while hasattr(owner, name):
        name += "_"
    owner.register_parameter(name, torch.nn.Parameter(shift.to(weight.device, weight.dtype), requires_grad=False))
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(f"{owner_name}.{name}" if owner_name else name)
    node.args = (*node.args[:2], attr, *node.args[3:])
    return True
