"""Weight surgery: the handlers that narrow producers and carriers and merge maps into consumers.

For kept channels K of a space:

* producer rows:   W' = W[K], b' = b[K]
* carrier slices:  p' = p[..., K, ...] on the parameter's channel dim (BatchNorm statistics, depthwise filters)
* consumer merge:  W'[:, k] = sum_c W[:, c] B[c, k] on the input-channel dim, for every kernel tap (conv) or
                   every position of a flattened input (linear after flatten, W viewed as [out, C, inner]);
                   without compensation B = I[:, K] and this is plain column slicing.

Indices along a multi-segment axis (after a concat) are the kept indices of each segment, shifted by the
segment's offset.
"""

from __future__ import annotations

import torch
from torch import fx

from grailc.channels import Layout


def get_param(gm: fx.GraphModule, target: str) -> torch.Tensor:
    return gm.get_parameter(target) if _is_param(gm, target) else gm.get_buffer(target)


def set_param(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer, keeping its kind."""
    owner_name, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if _is_param(gm, target):
        setattr(owner, name, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
    else:
        owner.register_buffer(name, value.detach().clone())


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def layout_index(layout: Layout, keep_of) -> torch.Tensor:
    """Indices kept along an axis laid out as ``layout``; ``keep_of(space)`` gives a segment's kept channels."""
    parts = []
    for seg, off in zip(layout.segments, layout.offsets()):
        parts.append(keep_of(seg.space, seg.size) + off)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def narrow_rows(weight: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return weight.index_select(dim, index.to(weight.device))


def merge_columns(weight: torch.Tensor, layout: Layout, maps: list[torch.Tensor]) -> torch.Tensor:
    """One map per segment on dim 1 of a consumer weight: segment s's columns become ``W_s @ maps[s]``.

    ``maps[s]`` is a [size_s, k_s] matrix (a GRAIL map), or a 1-D index of kept columns (plain pruning, I[:, K]).
    """
    out_dim = weight.shape[0]
    w = weight.reshape(out_dim, layout.size, layout.inner, -1)  # [O, C, inner, taps]
    pieces = [map_columns(w[:, off : off + seg.size], m) for seg, off, m in
              zip(layout.segments, layout.offsets(), maps)]
    merged = torch.cat(pieces, dim=1)
    k_total = merged.shape[1]
    if weight.dim() == 2:
        return merged.reshape(out_dim, k_total * layout.inner)
    return merged.reshape(out_dim, k_total, *weight.shape[2:])


def map_columns(cols: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """[O, C, inner, taps] columns through a map on C: a 1-D index keeps columns, a [C, k] matrix merges them
    (in float64)."""
    if m.dim() == 1:
        return cols.index_select(1, m.to(cols.device))
    return torch.einsum("ocit,ck->okit", cols.to(torch.float64), m.to(torch.float64)).to(cols.dtype)


def mask_columns(weight: torch.Tensor, slot, keep: torch.Tensor, B: torch.Tensor | None) -> torch.Tensor:
    """Full-width twin of a merge: the slot's columns become W B on the kept channels and 0 elsewhere."""
    layout = slot.consumer.layout
    w = weight.detach().clone()
    view = w.view(w.shape[0], layout.size, layout.inner, -1)
    cols = view[:, slot.offset : slot.offset + slot.size]
    kept = map_columns(cols, B if B is not None else keep)
    cols.zero_()
    cols[:, keep] = kept
    return w


def consumer_columns(weight: torch.Tensor, slot, dtype=torch.float64) -> torch.Tensor:
    """The slot's columns of a consumer weight as [rows, size] (every kernel tap / flattened position a row)."""
    layout = slot.consumer.layout
    w = weight.detach().reshape(weight.shape[0], layout.size, -1)[:, slot.offset : slot.offset + slot.size]
    return w.permute(0, 2, 1).reshape(-1, slot.size).to(dtype)


def selection(size: int, keep: torch.Tensor) -> torch.Tensor:
    """I[:, K]: the map of plain pruning."""
    eye = torch.eye(size, dtype=torch.float64)
    return eye[:, keep]
