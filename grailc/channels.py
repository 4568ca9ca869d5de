"""Channel spaces and layouts: the vocabulary of the dependency analysis.

A *space* is a set of channels that must be kept or removed together: the out-channels of a conv, merged with
every other axis tied to it (the other inputs of an ``add``, the channels of a BatchNorm, a depthwise conv). Spaces
live in a union-find; a *group* is the root of one. A space can be *pinned* (never pruned) with the reasons why.

A *layout* says where channels sit in one tensor: dimension ``axis`` (a negative index, so that broadcasting lines
up) holds ``segments`` back to back (more than one after a ``cat``), and each channel spans ``inner`` consecutive
elements (``inner = H*W`` after flattening ``[N, C, H, W]`` to ``[N, C*H*W]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Segment:
    space: int
    size: int


@dataclass(frozen=True)
class Layout:
    axis: int
    segments: tuple[Segment, ...]
    inner: int = 1

    @property
    def size(self) -> int:
        """Number of channels along the axis (elements: ``size * inner``)."""
        return sum(s.size for s in self.segments)

    def offsets(self) -> list[int]:
        """Channel offset of each segment along the axis."""
        out, start = [], 0
        for s in self.segments:
            out.append(start)
            start += s.size
        return out

    def with_axis(self, axis: int) -> Layout:
        return Layout(axis, self.segments, self.inner)


@dataclass
class Spaces:
    """Union-find over channel spaces, with the reasons each root is pinned."""

    parent: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    reasons: dict[int, list[str]] = field(default_factory=dict)

    def new(self, size: int, pinned: str | None = None) -> int:
        sid = len(self.parent)
        self.parent.append(sid)
        self.sizes.append(size)
        if pinned:
            self.reasons[sid] = [pinned]
        return sid

    def find(self, sid: int) -> int:
        while self.parent[sid] != sid:
            self.parent[sid] = self.parent[self.parent[sid]]
            sid = self.parent[sid]
        return sid

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.reasons.setdefault(ra, []).extend(self.reasons.pop(rb, []))
        if not self.reasons[ra]:
            del self.reasons[ra]
        return ra

    def pin(self, sid: int, reason: str) -> None:
        reasons = self.reasons.setdefault(self.find(sid), [])
        if reason not in reasons:
            reasons.append(reason)

    def pinned(self, sid: int) -> list[str]:
        return self.reasons.get(self.find(sid), [])
