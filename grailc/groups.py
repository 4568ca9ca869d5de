"""Channel-group facts: what the dependency analysis finds and every later pass reads.

* a **producer** computes the channels of a space (rows of a conv/linear weight; several for residual groups);
* a **consumer** reduces over them (columns of the next conv/linear weight); compensation merges ``B`` here;
* a **carrier** only carries them and is sliced (BatchNorm, depthwise and grouped convs, per-channel parameters,
  LayerNorm, the shape constants of views), or marks what they pass through (attention).

A :class:`ChannelGroup` gathers the facts of one root space. Its ``size`` counts *units* (channels, heads, conv
groups); a decision keeps whole units. Each producer and consumer sees the group through a *slot*: a segment of its
weight dimension, ``offset .. offset + size`` in that dimension's indices (or the listed ``positions`` after a
channel shuffle), ``per_unit`` indices per unit.
``pinned`` is the reason the group cannot be pruned; ``lossy`` the reason pruning it is only approximate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grailc.channel_map import ChannelMap
from grailc.channels import Layout, Spaces, take


@dataclass
class Producer:
    node: str
    module: str
    kind: str  # "conv" | "linear" | "embedding"
    weight: str  # parameter target; dim ``dim`` holds the produced channels
    bias: str | None
    layout: Layout  # the produced channels (segments after a split)
    dim: int = 0


@dataclass
class Consumer:
    node: str
    module: str
    kind: str  # "conv" | "linear"
    weight: str  # parameter target; dim ``dim`` holds the input channels (times ``layout.inner`` for linear)
    arg: int  # index of the consumed input in node.args
    layout: Layout  # layout of the consumed input
    dim: int = 1


@dataclass
class Carrier:
    node: str
    module: str
    layout: Layout
    params: list[tuple[str, int]]  # (parameter target, dim holding the indices of ``layout``)
    # integer arguments that follow the kept width: (arg index, position in a list arg or None, divisor[, segments]);
    # the new value is (kept indices along layout.axis, of the given segments only if named) * layout.inner // divisor,
    # e.g. a view's size, a conv's groups, the sizes of a split
    size_args: list[tuple[int, int | None, int]] = field(default_factory=list)
    tag: str | None = None  # "attention" for the ops that make a group a group of heads, "value_dims" for the
    # attention that reads value dims inside heads, "shuffle" for a channel shuffle
    lossy: bool = False  # normalisation over the channels: sliced, statistics approximated
    source: Layout | None = None  # a channel shuffle's input: the rewrite gathers ``layout`` from it


@dataclass(frozen=True)
class Slot:
    """One segment of a producer's or consumer's weight dimension: indices ``offset .. offset+size``, or the
    listed ``positions`` (one per index of the segment, in channel order) where a channel shuffle spread them."""

    fact: Producer | Consumer
    segment: int
    offset: int
    size: int
    per_unit: int  # indices per unit of the group
    positions: tuple[int, ...] | None = None

    def indices(self) -> torch.Tensor:
        """The slot's indices of its weight dimension, in channel order."""
        if self.positions is not None:
            return torch.tensor(self.positions, dtype=torch.long)
        return torch.arange(self.offset, self.offset + self.size)

    def take(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The slot's indices of dim ``dim`` of ``x`` (a view where they are consecutive)."""
        return take(x, dim, self.offset, self.size, self.positions)

    @property
    def consumer(self) -> Consumer:
        return self.fact

    @property
    def key(self) -> str:
        return f"{self.fact.node}[{self.segment}]"

    def map(self, units: ChannelMap) -> ChannelMap:
        """The slot's map over its indices (relative to ``offset``) for a map over the group's units."""
        return units.per_index(self.per_unit)

    def to_units(self, per_index: torch.Tensor) -> torch.Tensor:
        """Sum a per-index score over each unit."""
        return per_index.reshape(-1, self.per_unit).sum(1)


ConsumerSlot = Slot


@dataclass
class ChannelGroup:
    id: int
    size: int  # units
    producers: list[Slot] = field(default_factory=list)
    consumers: list[Slot] = field(default_factory=list)
    carriers: list[Carrier] = field(default_factory=list)
    pinned: str | None = None
    lossy: str | None = None  # why pruning this group is approximate (normalisation over its channels)
    understood: bool = False  # the analysis follows every use: the permutation check can run on it
    joins: list[str] = field(default_factory=list)  # how its tensors were combined elementwise: sum, product, other

    @property
    def kind(self) -> str:
        if any(c.tag == "attention" for c in self.carriers):
            return "heads"
        if any(c.tag == "value_dims" for c in self.carriers):
            return "value_dims"
        if len({p.fact.node for p in self.producers}) > 1:  # several producers, combined elementwise
            return "gated" if "product" in self.joins and "sum" not in self.joins else "residual"
        if self.producers:
            return self.producers[0].fact.kind
        return "opaque"

    @property
    def target(self) -> str:
        """Which ``targets`` entry selects this group: heads, vdims (value dims inside heads), embed (lossy) or
        channels."""
        if self.lossy:
            return "embed"
        return {"heads": "heads", "value_dims": "vdims"}.get(self.kind, "channels")

    @property
    def shuffled(self) -> bool:
        """Some consumer or carrier reads these channels in a channel shuffle's order (a selection, not a fold)."""
        return (any(s.positions is not None for s in self.consumers)
                or any(c.layout.order is not None for c in self.carriers))

    @property
    def granule(self) -> int:
        """Channels per unit at the first consumer (head_dim for heads), else at the first producer."""
        slots = self.consumers or self.producers
        return slots[0].per_unit if slots else 1

    @property
    def prunable(self) -> bool:
        return self.pinned is None

    def modules(self) -> list[str]:
        return list(dict.fromkeys(p.fact.module for p in self.producers))


@dataclass
class Dependencies:
    """The result of the analysis: facts per node and the groups they form."""

    spaces: Spaces
    producers: list[Producer]
    consumers: list[Consumer]
    carriers: list[Carrier]
    groups: dict[int, ChannelGroup]
    unknown_ops: list[dict]
    layouts: dict[str, Layout] = field(default_factory=dict)  # node name -> layout of its (tensor) output


    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups.values() if g.prunable]

    def maps_of(self, decisions: dict):
        """``(space) -> (channel map of its group's units, channels per unit)`` or None when the space's group is
        not decided."""
        find = self.spaces.find

        def lookup(space: int):
            d = decisions.get(find(space))
            return None if d is None else (d.map, self.spaces.unit(space))

        return lookup
