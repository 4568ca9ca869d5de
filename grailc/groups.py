"""Channel-group facts: what the dependency analysis finds and every later pass reads.

* a **producer** computes the channels of a space (rows of a conv/linear weight; several for residual groups);
* a **consumer** reduces over them (columns of the next conv/linear weight); compensation merges ``B`` here;
* a **carrier** only carries them and is sliced (BatchNorm, depthwise conv, per-channel parameters).

A :class:`ChannelGroup` gathers the facts of one root space. ``pinned`` is the reason it cannot be pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grailc.channels import Layout, Spaces


@dataclass
class Producer:
    node: str
    module: str
    kind: str  # "conv" | "linear"
    weight: str  # parameter target; rows (dim 0) are the channels
    bias: str | None
    space: int


@dataclass
class Consumer:
    node: str
    module: str
    kind: str  # "conv" | "linear"
    weight: str  # parameter target; dim 1 holds the input channels (times ``layout.inner`` for linear)
    arg: int  # index of the consumed input in node.args
    layout: Layout  # layout of the consumed input


@dataclass
class Carrier:
    node: str
    module: str
    layout: Layout
    params: list[tuple[str, int]]  # (parameter target, dim holding the channels)
    # integer arguments that follow the channel count: (arg index, position in a list arg or None, multiplier),
    # e.g. a depthwise conv's ``groups`` (6, None, 1) or a view's target size (1, q, inner)
    size_args: list[tuple[int, int | None, int]] = field(default_factory=list)


@dataclass(frozen=True)
class ConsumerSlot:
    """One segment of one consumer's input: channels ``offset .. offset+size`` belong to the group."""

    consumer: Consumer
    segment: int
    offset: int
    size: int

    @property
    def key(self) -> str:
        return f"{self.consumer.node}[{self.segment}]"


@dataclass
class ChannelGroup:
    id: int
    size: int
    producers: list[Producer] = field(default_factory=list)
    consumers: list[ConsumerSlot] = field(default_factory=list)
    carriers: list[Carrier] = field(default_factory=list)
    pinned: str | None = None

    @property
    def kind(self) -> str:
        if len(self.producers) > 1:
            return "residual"
        if self.producers:
            return self.producers[0].kind
        return "opaque"

    @property
    def prunable(self) -> bool:
        return self.pinned is None

    def modules(self) -> list[str]:
        return [p.module for p in self.producers]


@dataclass
class Dependencies:
    """The result of the analysis: facts per node and the groups they form."""

    spaces: Spaces
    producers: list[Producer]
    consumers: list[Consumer]
    carriers: list[Carrier]
    groups: dict[int, ChannelGroup]
    unknown_ops: list[dict]

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups.values() if g.prunable]
