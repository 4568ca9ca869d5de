"""Kernel taps: compensating a k x k convolution over (channel, tap) pairs instead of over channels.

A convolution is a linear map of its input patches: y = W p(x), with p(x) [rows, C * taps] the im2col patches
(channel-major, one row per output position, zero padding included) and W [O, C * taps]. GRAIL's channel map
shares one B by all taps: W' = W (B kron I_taps), so a removed channel is rebuilt from the kept channels *at the
same pixel*. Solved over taps, the consumer's new columns W' [O, k * taps] are fitted to its dense output from
the kept channels' patches p_K(z) at all the pixels the kernel reads, by the same ridge least squares:

    W' = (T + r W[:, K_p]) (Gz_p + r I)^-1,    K_p = {c * taps + t : c in K},
    Gz_p = sum p_K(z) p_K(z)^T,  T = sum y p_K(z)^T = W C_p,  r = lam * mean diag Gz_p,

which is W B_p for B_p the GRAIL map of the patches (C_p = sum p(x) p_K(z)^T), with the ridge pulling towards
plain pruning W[:, K_p]; the channel map is the special case B_p = B kron I, so on the calibration rows the error
can only fall. It is solved in the output space: the target y = W p(x) is the dense convolution's output, so T
costs O * k * taps per row where C_p would cost C * taps * k * taps, and the errors are exact output errors.
An offset d [O] (``grail+bias``, ``bias``) is the bias shift itself. In the compensators' terms: Gz = Gz_p,
C = T, Gx = sum y y^T, the sums of p_K(z) and of y, and the map ``output_map``.

It needs rows: W' has k * taps unknowns per output. A consumer is solved over taps when it sees at least
``TAPS_ROWS_PER_UNKNOWN`` rows (output positions, all processes) per kept (channel, tap) pair, else over channels;
it reads at most ``TAPS_ROWS_PER_UNKNOWN_READ`` of them per pair (``row_step``).
Only sequential calibration does it (after the group's selection), for 2-D convolutions with one group reading
their whole input as one slot, of a selection (a fold's merged channels are solved over channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from grailc.channel_map import ChannelMap
from grailc.surgery import get_param

CONV2D = torch.ops.aten.conv2d.default
TAPS_ROWS_PER_UNKNOWN = 1  # calibration rows per kept (channel, tap) pair a solve over taps needs
TAPS_ROWS_PER_UNKNOWN_READ = 64  # and the most it reads (evenly spread)


@dataclass(frozen=True)
class Kernel:
    """The geometry of a 2-D convolution consumer: what im2col needs."""

    size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def taps(self) -> int:
        return self.size[0] * self.size[1]

    def patches(self, x: torch.Tensor, step: int = 1) -> torch.Tensor:
        """[rows, C * taps]: the patches of x [N, C, H, W] the kernel reads, one row per output position (every
        ``step``-th, in the order image, row, column). With ``step`` > 1 only those rows are gathered (from the
        zero-padded input, tap by tap), never the whole im2col matrix."""
        if step == 1:
            p = F.unfold(x, self.size, self.dilation, self.padding, self.stride)  # [N, C * taps, L]
            return p.transpose(1, 2).reshape(-1, p.shape[1])
        h, w = self.out_size(x.shape)
        index = torch.arange(0, x.shape[0] * h * w, step, device=x.device)
        n, oh, ow = index // (h * w), index % (h * w) // w, index % w
        padded = F.pad(x, (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
        taps = [padded[n, :, oh * self.stride[0] + i * self.dilation[0], ow * self.stride[1] + j * self.dilation[1]]
                for i in range(self.size[0]) for j in range(self.size[1])]  # each [rows, C]
        return torch.stack(taps, 2).reshape(len(index), -1)  # channel-major: c * taps + t, as unfold

    def out_size(self, shape) -> tuple[int, int]:
        """The output's height and width for an input of ``shape`` [N, C, H, W]."""
        h, w = ((n + 2 * p - d * (k - 1) - 1) // s + 1
                for n, k, s, p, d in zip(shape[2:], self.size, self.stride, self.padding, self.dilation))
        return h, w

    def positions(self, shape) -> int:
        """Output positions of an input of ``shape`` [N, C, H, W]."""
        h, w = self.out_size(shape)
        return shape[0] * h * w


def row_step(rows: int, unknowns: int, width: int) -> int:
    """Every how many patch rows the statistics read: enough for ``TAPS_ROWS_PER_UNKNOWN_READ`` rows per unknown
    and no more (1: all), a step coprime with the output ``width`` so that the rows read cycle through the
    columns instead of always falling on the same ones."""
    step = max(1, rows // (TAPS_ROWS_PER_UNKNOWN_READ * unknowns))
    while step > 1 and math.gcd(step, width) != 1:
        step -= 1
    return step


def _pair(v, default: int) -> tuple[int, int] | None:
    v = default if v is None else v
    if isinstance(v, int):
        return v, v
    if isinstance(v, (list, tuple)) and all(isinstance(e, int) for e in v):
        return (v[0], v[0]) if len(v) == 1 else (v[0], v[1]) if len(v) == 2 else None
    return None


def tap_kernel(gm: fx.GraphModule, node: fx.Node, slots: list) -> Kernel | None:
    """The kernel of consumer ``node`` where it can be solved over taps (a 2-D convolution with one group, a
    kernel wider than 1 x 1, integer geometry, one slot reading all its input channels), else None."""
    if node.target != CONV2D or len(slots) != 1:
        return None
    slot, args = slots[0], list(node.args) + [None] * (7 - len(node.args))
    weight = get_param(gm, slot.consumer.weight)
    if (args[6] or 1) != 1 or slot.offset != 0 or slot.positions is not None or slot.size != weight.shape[1]:
        return None
    geometry = [_pair(args[i], d) for i, d in ((3, 1), (4, 0), (5, 1))]
    if any(g is None for g in geometry) or weight.shape[2] * weight.shape[3] == 1:
        return None
    return Kernel((weight.shape[2], weight.shape[3]), *geometry)


def kept_taps(cmap: ChannelMap, taps: int) -> torch.Tensor:
    """K_p = {c * taps + t : c in K} of a selection K over channels."""
    return cmap.per_index(taps).keep


@dataclass(frozen=True)
class OutputMap:
    """The channel map a compensator solves with in the output space (read as a :class:`ChannelMap`): the kept
    patches are already the new units (R = I), read back into the consumer's output through its kept columns
    (U = W[:, K_p], plain pruning), so that B is W' itself and an offset the bias shift (module docstring)."""

    columns: torch.Tensor  # W[:, K_p], [O, k * taps], float64
    is_selection = False

    @property
    def k(self) -> int:
        return self.columns.shape[1]

    def U(self) -> torch.Tensor:
        return self.columns

    def gram(self, G: torch.Tensor) -> torch.Tensor:
        return G.to(torch.float64)

    def cols(self, C: torch.Tensor) -> torch.Tensor:
        return C.to(torch.float64)

    def vec(self, s: torch.Tensor) -> torch.Tensor:
        return s.to(torch.float64)

    def spread_cols(self, M: torch.Tensor) -> torch.Tensor:
        return M.to(torch.float64) @ self.columns

    def back(self, v: torch.Tensor) -> torch.Tensor:
        return self.columns @ v.to(torch.float64)


def output_map(weight: torch.Tensor, K_p: torch.Tensor) -> OutputMap:
    """The consumer's ``OutputMap`` for the kept (channel, tap) pairs ``K_p``."""
    return OutputMap(weight.detach().reshape(weight.shape[0], -1).to("cpu", torch.float64)[:, K_p].contiguous())


def dense_output(x: torch.Tensor, weight: torch.Tensor, kernel: Kernel, step: int) -> torch.Tensor:
    """[rows, O]: the dense consumer's output without bias, y = W p(x), one row per output position (every
    ``step``-th, in the order of ``Kernel.patches``): the convolution where every row is read, else the product
    with the patches of the rows read alone (1 / step of the convolution's work)."""
    weight = weight.detach().to(x.dtype)
    if step > 1:
        return kernel.patches(x, step) @ weight.reshape(weight.shape[0], -1).T
    y = F.conv2d(x, weight, None, kernel.stride, kernel.padding, kernel.dilation)
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
