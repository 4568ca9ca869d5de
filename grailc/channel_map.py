"""Channel maps: what a decision does to the units of a group, the one object that apply, surgery, the
compensators and the report read.

A map takes ``size`` old units to ``k`` new ones:

    z = R x      R [k, size], the *merge*: how producers and carriers form the new units (their rows become R W)
    x ~ U z      U [size, k], the *spread*: how a consumer reads the old units back without compensation (W U)

Selecting the kept units K is R = I[K], U = I[:, K]; it is held as K alone and applied by indexing. Folding holds
both matrices: R averages the units of each cluster, U assigns every unit to its cluster. Compensation reads the
map the same way for both (GRAIL: B = (C R^T + r U)(R G R^T + r I)^-1).

A map over units becomes a map over the indices of a tensor axis by ``per_index`` (a unit covering ``p`` indices:
R kron I_p), and the maps of the segments of an axis (after a ``cat``) stack block-diagonally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grailc.channels import unit_indices

F64 = torch.float64


@dataclass(frozen=True)
class ChannelMap:
    size: int
    keep: torch.Tensor | None = None  # a selection: the kept units (sorted, or permuted by the self-check)
    merge: torch.Tensor | None = None  # a fold: R [k, size]
    spread: torch.Tensor | None = None  # a fold: U [size, k]

    @classmethod
    def select(cls, keep: torch.Tensor, size: int) -> ChannelMap:
        return cls(size, keep=keep.to(torch.long))

    @classmethod
    def identity(cls, size: int) -> ChannelMap:
        return cls.select(torch.arange(size), size)

    @classmethod
    def fold(cls, labels: torch.Tensor, k: int) -> ChannelMap:
        """The fold of ``size`` units into ``k`` clusters (``labels[c]`` the cluster of unit c): R averages each
        cluster, U assigns each unit to its cluster."""
        labels = labels.to(torch.long)
        spread = torch.zeros(len(labels), k, dtype=F64)
        spread[torch.arange(len(labels)), labels] = 1.0
        counts = spread.sum(0).clamp_min(1.0)
        return cls(len(labels), merge=(spread / counts).T.contiguous(), spread=spread)

    @property
    def is_selection(self) -> bool:
        return self.keep is not None

    @property
    def k(self) -> int:
        return len(self.keep) if self.is_selection else self.merge.shape[0]

    def R(self) -> torch.Tensor:
        """The merge as a matrix [k, size] (float64)."""
        return torch.eye(self.size, dtype=F64)[self.keep] if self.is_selection else self.merge

    def U(self) -> torch.Tensor:
        """The spread as a matrix [size, k] (float64)."""
        return torch.eye(self.size, dtype=F64)[:, self.keep] if self.is_selection else self.spread

    def columns(self) -> torch.Tensor:
        """The consumer's map without compensation: the kept indices (a 1-D index) or U."""
        return self.keep if self.is_selection else self.spread

    def per_index(self, per_unit: int) -> ChannelMap:
        """The same map over indices, ``per_unit`` consecutive indices per unit."""
        if per_unit == 1:
            return self
        if self.is_selection:
            return ChannelMap.select(unit_indices(self.keep, per_unit), self.size * per_unit)
        eye = torch.eye(per_unit, dtype=F64)
        return ChannelMap(self.size * per_unit, merge=torch.kron(self.merge, eye), spread=torch.kron(self.spread, eye))

    @staticmethod
    def stack(parts: list[ChannelMap]) -> ChannelMap:
        """The map of an axis whose segments follow each other: block-diagonal."""
        if all(p.is_selection for p in parts):
            offsets = torch.tensor([0, *(p.size for p in parts)]).cumsum(0)
            keep = torch.cat([p.keep + int(o) for p, o in zip(parts, offsets)]) if parts else torch.zeros(0)
            return ChannelMap.select(keep, int(offsets[-1]))
        return ChannelMap(sum(p.size for p in parts), merge=torch.block_diag(*(p.R() for p in parts)),
                          spread=torch.block_diag(*(p.U() for p in parts)))

    # -- applying the map --------------------------------------------------------------------------------------
    def rows(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """t' = R t along ``dim`` (producer rows, carrier parameters, activations), in t's dtype."""
        if self.is_selection:
            return t.index_select(dim, self.keep.to(t.device))
        merged = torch.tensordot(self.merge.to(t.device), t.movedim(dim, 0).to(F64), dims=1)
        return merged.movedim(0, dim).to(t.dtype).contiguous()

    def gram(self, G: torch.Tensor) -> torch.Tensor:
        """R G R^T."""
        if self.is_selection:
            return G[self.keep[:, None], self.keep]
        return self.merge @ G.to(F64) @ self.merge.T

    def cols(self, C: torch.Tensor) -> torch.Tensor:
        """C R^T (the columns of a cross-Gram towards the new units)."""
        return C.index_select(1, self.keep) if self.is_selection else C.to(F64) @ self.merge.T

    def vec(self, s: torch.Tensor) -> torch.Tensor:
        """R s."""
        return s[self.keep] if self.is_selection else self.merge @ s.to(F64)

    def spread_cols(self, M: torch.Tensor) -> torch.Tensor:
        """M U (the columns of M read through the spread: M[:, K] for a selection)."""
        return M.index_select(1, self.keep) if self.is_selection else M.to(F64) @ self.spread

    def back(self, v: torch.Tensor) -> torch.Tensor:
        """U v: new units read back as old ones (v on K, 0 elsewhere, for a selection)."""
        if not self.is_selection:
            return self.spread @ v.to(F64)
        out = torch.zeros(self.size, dtype=v.dtype)
        out[self.keep] = v
        return out
