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

from grailc.passmanager import Pass, register_pass
from grailc.surgery import (
    add_to_bias,
    bias_of,
    get_param,
    layout_map,
    merge_columns,
    offset_shift,
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
        for i, (seg, off) in enumerate(zip(consumer.layout.segments, consumer.layout.offsets())):
            fold = folds.get(f"{consumer.node}[{i}]")
            if fold is not None and fold.B is not None:
                maps.append(fold.B)
            else:
                maps.append(layout_map(replace(consumer.layout, segments=(seg,), inner=1), maps_of).columns())
            if fold is not None and fold.offset is not None:  # b' = b + W c, from the dense columns
                part = offset_shift(gm, consumer, w, off, consumer.layout.seg_length(seg), fold.offset)
                shift = part if shift is None else shift + part
        set_param(gm, consumer.weight, merge_columns(w, consumer.layout, maps, consumer.dim))
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
                if segments:  # the width of some segments only (the outputs of a split)
                    part = [car.layout.segments[i] for i in _as_tuple(segments[0])]
                    value = layout_map(replace(car.layout, segments=tuple(part)), maps_of).k * car.layout.inner
                if pos is None:
                    args[arg] = value // div
                else:
                    if isinstance(args[arg], int):  # split(x, size, dim): one size for all, written out per output
                        args[arg] = [int(v.shape[args[2] if len(args) > 2 else 0]) for v in node.meta["val"]]
                        node.target = SPLIT_WITH_SIZES
                    args[arg] = [*args[arg][:pos], value // div, *args[arg][pos + 1 :]]
            node.args = tuple(args)


def _as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


@register_pass
class Apply(Pass):
    name = "apply"
    requires = ("deps",)
    changes_graph = True

    def run(self, ctx) -> None:
        rewrite(ctx.gm, ctx.deps, ctx.decisions, ctx.folds)
        ctx.applied_deps = ctx.deps
