"""Apply: the only pass that changes weights.

For every group with a decision: producers keep rows K, carriers keep K along their channel dim (a depthwise
conv's ``groups`` and a view's size follow the new width), and each consumer's columns become W B (B from
compensation) or W[:, K].
Groups without a decision and pinned groups keep all their channels.
"""

from __future__ import annotations

import torch

from grailc.passmanager import Pass, register_pass
from grailc.surgery import get_param, layout_index, merge_columns, narrow_rows, set_param


def rewrite(gm, deps, decisions: dict, folds: dict) -> None:
    """Narrow and merge ``gm`` in place according to ``decisions`` (group id -> Decision) and ``folds``."""
    find = deps.spaces.find

    def keep_of(space: int, size: int) -> torch.Tensor:
        d = decisions.get(find(space))
        return d.keep if d is not None else torch.arange(size)

    for consumer in deps.consumers:
        if not any(find(s.space) in decisions for s in consumer.layout.segments):
            continue
        maps = []
        for i, seg in enumerate(consumer.layout.segments):
            fold = folds.get(f"{consumer.node}[{i}]")
            if fold is not None and fold.B is not None:
                maps.append(fold.B)
            else:
                maps.append(keep_of(seg.space, seg.size))
        set_param(gm, consumer.weight, merge_columns(get_param(gm, consumer.weight), consumer.layout, maps))

    for p in deps.producers:
        if find(p.space) in decisions:
            idx = decisions[find(p.space)].keep
            set_param(gm, p.weight, narrow_rows(get_param(gm, p.weight), idx))
            if p.bias:
                set_param(gm, p.bias, narrow_rows(get_param(gm, p.bias), idx))

    nodes = {n.name: n for n in gm.graph.nodes}
    for car in deps.carriers:
        if not any(find(s.space) in decisions for s in car.layout.segments):
            continue
        idx = layout_index(car.layout, keep_of)
        for target, dim in car.params:
            set_param(gm, target, narrow_rows(get_param(gm, target), idx, dim))
        if car.size_args:
            node = nodes[car.node]
            args = list(node.args)
            for arg, pos, mult in car.size_args:
                if pos is None:
                    args[arg] = len(idx) * mult
                else:
                    args[arg] = [*args[arg][:pos], len(idx) * mult, *args[arg][pos + 1 :]]
            node.args = tuple(args)


@register_pass
class Apply(Pass):
    name = "apply"
    requires = ("deps",)
    changes_graph = True

    def run(self, ctx) -> None:
        rewrite(ctx.gm, ctx.deps, ctx.decisions, ctx.folds)
        ctx.applied_deps = ctx.deps
