"""Channel spaces and layouts: the vocabulary of the dependency analysis.

A *space* is the set of channels one producer computes (the out-channels of a conv, the rows of a linear). Spaces
are pruned in *units*: ``unit`` consecutive channels are kept or removed together (1 for conv channels, ``head_dim``
for attention heads, ``C/groups`` for a grouped convolution). Spaces that must keep the same units are merged in a
union-find; a *group* is the root of one, with ``units`` units, each member space having its own channels per unit
(query heads of width 64 and grouped-query key heads: one unit = ``r`` query heads = one key head). A space can be
*pinned* (never pruned) or *lossy* (pruning changes a statistic over its channels: LayerNorm, RMSNorm), with reasons.

A fresh space can be *split* into parts once (a fused qkv projection into q, k and v); facts recorded against the
whole are read through its parts.

A *layout* says where the channels of some spaces sit in one tensor. Index ``i`` of dimension ``axis`` (a negative
index, so that broadcasting lines up) holds

* ``granule`` channels (1: plain channels; ``head_dim`` for a ``[B, H, T, D]`` tensor, whose ``D`` axis is listed in
  ``split``, or whose within-head channels were reduced away when ``split`` is empty), and
* spans ``inner`` consecutive elements (``inner = H*W`` after flattening ``[N, C, H, W]`` to ``[N, C*H*W]``; ``r``
  after grouped-query ``repeat_kv``, where index ``i`` is key head ``i // r``).

``segments`` follow each other along the axis (after a ``cat``), or, when ``seg_axis`` is set, sit at the indices of
``seg_axis`` and share the positions of ``axis`` (``[3, B, H, T, D]`` after a fused qkv projection). When ``outer``
is set the axis also carries a leading factor, the batch: ``nn.MultiheadAttention`` views ``[T, B, H*D]`` as
``[T, B*H, D]``, whose index ``b*H + h`` is head ``h``.

After a channel shuffle (ShuffleNet's view ``[N, g, C/g, H, W]``, transpose, view back) the channels no longer
follow each other segment by segment: ``order`` then lists, per index of ``axis``, which channel of the stacked
segments sits there (channel ``j`` of segment ``s`` is ``sum(sizes before s) + j``). Every channel of the segments
sits at exactly one index (plain channels: ``granule`` and ``inner`` 1, no segment axis). Where a layout with an
order is narrowed, the kept channels keep the relative order of their indices, and the indices that segment ``s``
keeps take its kept channels in the order of its channel map (see :func:`grailc.surgery.narrowed_indices`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class Segment:
    space: int
    size: int  # channels


@dataclass(frozen=True)
class Layout:
    axis: int
    segments: tuple[Segment, ...]
    inner: int = 1
    granule: int = 1
    split: tuple[int, ...] = ()
    seg_axis: int | None = None
    outer: bool = False  # the axis also carries a leading factor: index i holds index i mod length (B*H of MHA)
    order: tuple[int, ...] | None = None  # after a channel shuffle: the stacked channel at each index of ``axis``

    @property
    def size(self) -> int:
        """Channels of all segments."""
        return sum(s.size for s in self.segments)

    def seg_length(self, seg: Segment) -> int:
        """Indices one segment takes along ``axis``."""
        return seg.size // self.granule

    @property
    def length(self) -> int:
        """Indices along ``axis`` (elements: ``length * inner``)."""
        if self.order is not None:
            return len(self.order)
        if self.seg_axis is not None:
            return self.seg_length(self.segments[0])
        return sum(self.seg_length(s) for s in self.segments)

    def offsets(self) -> list[int]:
        """Index offset of each segment along ``axis`` (of the stacked channels when the layout has an order)."""
        if self.seg_axis is not None:
            return [0] * len(self.segments)
        out, start = [], 0
        for s in self.segments:
            out.append(start)
            start += self.seg_length(s)
        return out

    def seg_positions(self, i: int) -> tuple[int, ...]:
        """The index along ``axis`` of each channel of segment ``i``, in channel order."""
        if self.order is None:
            start = self.offsets()[i]
            return tuple(range(start, start + self.seg_length(self.segments[i])))
        first = sum(s.size for s in self.segments[:i])
        where = {c: p for p, c in enumerate(self.order)}
        return tuple(where[first + j] for j in range(self.segments[i].size))

    def with_axis(self, axis: int) -> Layout:
        return replace(self, axis=axis)

    def axes(self) -> list[int]:
        """Every tensor axis this layout describes (main, within-granule, segment)."""
        return [self.axis, *self.split] + ([self.seg_axis] if self.seg_axis is not None else [])

    def remap(self, old_ndim: int, new_ndim: int, where: dict[int, int | None]) -> Layout | None:
        """The layout after an op that moves dims (``where``: old positive dim -> new positive dim or None when the
        dim is gone). None when the main or segment axis is gone; a within-granule axis that is gone is dropped."""
        def move(a: int) -> int | None:
            new = where.get(a + old_ndim, None)
            return None if new is None else new - new_ndim

        axis = move(self.axis)
        seg = move(self.seg_axis) if self.seg_axis is not None else None
        if axis is None or (self.seg_axis is not None and seg is None):
            return None
        split = tuple(s for s in (move(a) for a in self.split) if s is not None)
        return replace(self, axis=axis, split=split, seg_axis=seg)


def take(x: torch.Tensor, dim: int, start: int, size: int, positions: tuple[int, ...] | None) -> torch.Tensor:
    """Indices ``start .. start + size`` of dim ``dim`` (a view), or the listed ``positions`` where a channel
    shuffle spread them."""
    if positions is None:
        return x.narrow(dim, start, size)
    return x.index_select(dim, torch.tensor(positions, device=x.device))


def unit_indices(units: torch.Tensor, per_unit: int) -> torch.Tensor:
    """Indices of whole units: unit u covers ``u*per_unit .. u*per_unit + per_unit - 1`` (order of ``units`` kept)."""
    units = units.to(torch.long)
    return (units[:, None] * per_unit + torch.arange(per_unit)).reshape(-1)


@dataclass
class Spaces:
    """Union-find over channel spaces: units, members, pinned and lossy reasons, how spaces were joined by
    elementwise ops, and split parts."""

    parent: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    units_of: list[int] = field(default_factory=list)  # channels per unit, per space
    members: dict[int, list[int]] = field(default_factory=dict)  # root -> spaces
    reasons: dict[int, list[str]] = field(default_factory=dict)
    lossy_reasons: dict[int, list[str]] = field(default_factory=dict)
    joins: dict[int, list[str]] = field(default_factory=dict)  # root -> "sum" (add, sub), "product" (mul, div), ...
    parts: dict[int, list[int]] = field(default_factory=dict)  # split space -> its parts

    def new(self, size: int, pinned: str | None = None) -> int:
        sid = len(self.parent)
        self.parent.append(sid)
        self.sizes.append(size)
        self.units_of.append(1)
        self.members[sid] = [sid]
        if pinned:
            self.reasons[sid] = [pinned]
        return sid

    def find(self, sid: int) -> int:
        while self.parent[sid] != sid:
            self.parent[sid] = self.parent[self.parent[sid]]
            sid = self.parent[sid]
        return sid

    def unit(self, sid: int) -> int:
        """Channels per unit of this space."""
        return self.units_of[sid]

    def units(self, sid: int) -> int:
        """Units of the group this space belongs to."""
        return self.sizes[sid] // self.units_of[sid]

    def coarsen(self, sid: int, factor: int) -> bool:
        """Make every unit of the group ``factor`` units wide (False when the unit count does not divide)."""
        if factor == 1:
            return True
        root = self.find(sid)
        if self.units(root) % factor:
            return False
        for m in self.members[root]:
            self.units_of[m] *= factor
        return True

    def align(self, a: int, per_a: int, b: int, per_b: int) -> bool:
        """Tie two spaces block by block: ``per_a`` channels of ``a`` go with ``per_b`` channels of ``b``, in order.
        Coarsens both groups as needed and merges them; False when that is impossible."""
        for sid, per in ((a, per_a), (b, per_b)):
            u = self.unit(sid)
            if not self.coarsen(sid, math.lcm(u, per) // u):
                return False
        ka, kb = self.unit(a) // per_a, self.unit(b) // per_b
        if self.find(a) == self.find(b):
            return ka == kb and self.units(a) == self.units(b)
        k = math.lcm(ka, kb)
        if not (self.coarsen(a, k // ka) and self.coarsen(b, k // kb)):
            return False
        if self.units(a) != self.units(b):
            return False
        self._merge(self.find(a), self.find(b))
        return True

    def union(self, a: int, b: int) -> bool:
        """Tie two spaces channel by channel."""
        return self.align(a, 1, b, 1)

    def _merge(self, ra: int, rb: int) -> None:
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.members[ra].extend(self.members.pop(rb))
        for store in (self.reasons, self.lossy_reasons, self.joins):
            moved = store.pop(rb, [])
            if moved:
                store.setdefault(ra, []).extend(r for r in moved if r not in store.get(ra, []))

    def split(self, sid: int, sizes: list[int]) -> list[int] | None:
        """Split a space tied to no other into parts of whole units (each part starts with units of one channel);
        None when it cannot be split."""
        if sid in self.parts:
            return self.parts[sid] if [self.sizes[p] for p in self.parts[sid]] == sizes else None
        root = self.find(sid)
        whole = all(s % self.units_of[sid] == 0 for s in sizes)
        if root != sid or len(self.members[root]) != 1 or not whole or sum(sizes) != self.sizes[sid]:
            return None
        reasons = self.reasons.get(sid, [])
        self.parts[sid] = [self.new(s) for s in sizes]
        for p in self.parts[sid]:
            for r in reasons:
                self.pin(p, r)
        return self.parts[sid]

    def resolve(self, segments) -> tuple[Segment, ...]:
        """Segments with every split space replaced by its parts."""
        out = []
        for s in segments:
            if s.space in self.parts:
                out.extend(self.resolve([Segment(p, self.sizes[p]) for p in self.parts[s.space]]))
            else:
                out.append(s)
        return tuple(out)

    def pin(self, sid: int, reason: str) -> None:
        for part in self.resolve([Segment(sid, self.sizes[sid])]):
            reasons = self.reasons.setdefault(self.find(part.space), [])
            if reason not in reasons:
                reasons.append(reason)

    def mark_lossy(self, sid: int, reason: str) -> None:
        for part in self.resolve([Segment(sid, self.sizes[sid])]):
            reasons = self.lossy_reasons.setdefault(self.find(part.space), [])
            if reason not in reasons:
                reasons.append(reason)

    def mark_join(self, sid: int, how: str) -> None:
        """Record that tensors holding this group's channels were combined elementwise (``how``)."""
        for part in self.resolve([Segment(sid, self.sizes[sid])]):
            joins = self.joins.setdefault(self.find(part.space), [])
            if how not in joins:
                joins.append(how)

    def pinned(self, sid: int) -> list[str]:
        return self.reasons.get(self.find(sid), [])

    def lossy(self, sid: int) -> list[str]:
        return self.lossy_reasons.get(self.find(sid), [])
