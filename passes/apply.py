"""Apply: the only pass that changes weights.

For every group with a decision (a channel map: kept units K, or a fold R, U): producers' rows become R W (W[K]),
carriers map their parameters the same way along their dimension (a grouped conv's ``groups``, a view's or an
expand's size and a LayerNorm's shape follow the new width), and each consumer's columns become W B (B from
compensation) or W U (W[:, K]), its bias b + W c where compensation gives an offset c. A unit of ``u`` channels
seen through a layout of granule ``g`` covers ``u / g`` indices. Groups without a decision and pinned groups keep
everything.
A parameter shared by several nodes (a module called twice) is narrowed once.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx

from grailc.channels import Layout, Segment
from grailc.passmanager import Pass, register_pass
from grailc.surgery import (
    add_to_bias,
    bias_of,
    fold_map,
    fold_shift,
    get_param,
    layout_map,
    merge_columns,
    narrowed_indices,
    segment_maps,
    set_param,
)

SPLIT_WITH_SIZES = torch.ops.aten.split_with_sizes.default


def rewrite(gm, deps, decisions: dict, folds: dict) -> None:
    """Narrow and merge ``gm`` in place according to ``decisions`` (group id -> Decision) and ``folds``."""
    maps_of = deps.maps_of(decisions)
    decided = lambda layout: any(maps_of(s.space) is not None for s in layout.segments)  # noqa: E731
    done: dict[str, set[str]] = {"consumer": set(), "producer": set(), "carrier": set()}  # per role

    for consumer in deps.consumers:
        if not decided(consumer.layout) or consumer.weight in done["consumer"]:
            continue
        done["consumer"].add(consumer.weight)
        maps, shift = [], None
        w = get_param(gm, consumer.weight)
        cmaps = segment_maps(replace(consumer.layout, seg_axis=None), maps_of)
        for i, cmap in enumerate(cmaps):
            fold = folds.get(f"{consumer.node}[{i}]")
            maps.append(fold_map(fold, cmap))
            if fold is not None and fold.offset is not None:  # b' = b + W c, from the dense columns
                part = fold_shift(gm, consumer, w, torch.tensor(consumer.layout.seg_positions(i)), fold)
                shift = part if shift is None else shift + part
        targets = narrowed_indices(consumer.layout, cmaps)
        set_param(gm, consumer.weight, merge_columns(w, consumer.layout, maps, targets, consumer.dim))
        if shift is not None:
            add_to_bias(gm, consumer, shift)

    for p in deps.producers:
        if not decided(p.layout) or p.weight in done["producer"]:
            continue
        done["producer"].add(p.weight)
        cmap = layout_map(p.layout, maps_of)
        set_param(gm, p.weight, cmap.rows(get_param(gm, p.weight), p.dim))
        bias = p.bias or (bias_of(gm, p.node) if p.kind in ("conv", "linear") else None)  # or one added above
        if bias:
            set_param(gm, bias, cmap.rows(get_param(gm, bias)))

    nodes = {n.name: n for n in gm.graph.nodes}
    for car in deps.carriers:
        if not decided(car.layout):
            continue
        if car.tag == "shuffle":
            gather_shuffled(gm, nodes[car.node], car, maps_of)
            continue
        cmap = layout_map(car.layout, maps_of)
        for target, dim in car.params:
            if target not in done["carrier"]:
                done["carrier"].add(target)
                set_param(gm, target, cmap.rows(get_param(gm, target), dim))
        if car.size_args:
            node = nodes[car.node]
            args = list(node.args)
            for arg, pos, div, *segments in car.size_args:
                value = cmap.k * car.layout.inner
                if segments:  # the width of some spaces only (the outputs of a split)
                    part = deps.spaces.resolve([Segment(sid, deps.spaces.sizes[sid]) for sid in segments[0]])
                    value = layout_map(Layout(car.layout.axis, part), maps_of).k
                if pos is None:
                    args[arg] = value // div
                else:
                    if isinstance(args[arg], int):  # split(x, size, dim): one size for all, written out per output
                        args[arg] = [int(v.shape[args[2] if len(args) > 2 else 0]) for v in node.meta["val"]]
                        node.target = SPLIT_WITH_SIZES
                    args[arg] = [*args[arg][:pos], value // div, *args[arg][pos + 1 :]]
            node.args = tuple(args)


def gather_shuffled(gm, last: fx.Node, car, maps_of) -> None:
    """A channel shuffle (view, transpose, view) becomes one gather: ``index_select`` of its input at the indices
    that put each kept channel where :func:`~grailc.surgery.narrowed_indices` says the output holds it (the kept
    counts of the two halves need not match, as the view to [.., g, C/g, ..] would require)."""
    maps = segment_maps(car.layout, maps_of)
    index = torch.empty(sum(m.k for m in maps), dtype=torch.long)
    for out, src in zip(narrowed_indices(car.layout, maps), narrowed_indices(car.source, maps)):
        index[out] = src
    chain = [last.args[0]]  # (contiguous), transpose, the first view
    if chain[0].target != torch.ops.aten.transpose.int:
        chain.append(chain[0].args[0])
    chain.append(chain[-1].args[0])
    x = chain[-1].args[0]
    name = f"{last.name}_channels"
    where = next(gm.parameters(), next(gm.buffers(), None))  # the graph's device (its trace's meta may be elsewhere)
    gm.register_buffer(name, index.to(where.device if where is not None else "cpu"))
    with gm.graph.inserting_before(last):
        attr = gm.graph.get_attr(name)
        gather = gm.graph.call_function(torch.ops.aten.index_select.default,
                                        (x, x.meta["val"].dim() + car.layout.axis, attr))
    gather.meta = dict(last.meta)
    last.replace_all_uses_with(gather)
    for node in [last, *chain]:
        if not node.users:
            gm.graph.erase_node(node)


@register_pass
class Apply(Pass):
    name = "apply"
    requires = ("deps",)
    changes_graph = True

    def run(self, ctx) -> None:
        rewrite(ctx.gm, ctx.deps, ctx.decisions, ctx.folds)
        ctx.applied_deps = ctx.deps
