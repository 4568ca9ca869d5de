"""Kernel taps: a k x k convolution consumer solved over (channel, tap) pairs of its patches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from grailc.passes.taps import Kernel, dense_output, kept_taps, output_map
from torch import nn

import grailc
from grailc.channel_map import ChannelMap
from grailc.context import Fold, SlotStats
from grailc.errors import RecipeError
from grailc.recipe import Recipe
from grailc.registry import COMPENSATORS, load_builtin
from grailc.surgery import NewColumns, fold_map, fold_shift, map_columns


def test_patches_are_what_the_convolution_reads():
    kernel = Kernel((3, 3), (2, 2), (1, 1), (1, 1))
    x, w = torch.randn(2, 4, 9, 9), torch.randn(5, 4, 3, 3)
    y = F.conv2d(x, w, stride=2, padding=1)
    rows = kernel.patches(x) @ w.reshape(5, -1).T  # [N * L, O]
    assert rows.shape[0] == kernel.positions(x.shape) == 2 * 5 * 5
    torch.testing.assert_close(rows, y.permute(0, 2, 3, 1).reshape(-1, 5), rtol=1e-5, atol=1e-5)


def test_sampled_rows_are_the_rows_of_the_whole_patch_matrix():
    """With a step, the patches are gathered at the rows read only; they and the dense output must be those rows of
    the whole im2col matrix and of the convolution, for any geometry."""
    for size, stride, padding, dilation in (((3, 3), (1, 1), (1, 1), (1, 1)), ((1, 7), (1, 1), (0, 3), (1, 1)),
                                            ((3, 3), (2, 2), (1, 1), (1, 1)), ((3, 5), (2, 1), (2, 1), (2, 1)),
                                            ((5, 5), (3, 3), (0, 0), (1, 1))):
        kernel = Kernel(size, stride, padding, dilation)
        x, w = torch.randn(3, 4, 11, 13), torch.randn(6, 4, *size)
        whole = kernel.patches(x)
        for step in (2, 3, 7):
            torch.testing.assert_close(kernel.patches(x, step), whole[::step], rtol=0, atol=0)
            y = F.conv2d(x, w, None, stride, padding, dilation).permute(0, 2, 3, 1).reshape(-1, 6)
            torch.testing.assert_close(dense_output(x, w, kernel, step), y[::step], rtol=1e-5, atol=1e-5)


def test_the_output_space_solve_is_the_patch_space_grail_map_merged():
    """W' = (T + r W[:, K_p]) (Gz_p + r I)^-1 with T = sum y p_K(z)^T equals W B_p, B_p the GRAIL ridge map of the
    patches (C_p = sum p(x) p_K(z)^T); the kept pairs' patches are the kept channels' patches."""
    torch.manual_seed(0)
    kernel = Kernel((3, 3), (1, 1), (1, 1), (1, 1))
    keep = torch.tensor([0, 2, 3])
    K_p = kept_taps(ChannelMap.select(keep, 5), 9)
    x, z = torch.randn(4, 5, 6, 6, dtype=torch.float64), torch.randn(4, 5, 6, 6, dtype=torch.float64)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64)
    b = kernel.patches(z[:, keep])
    torch.testing.assert_close(b, kernel.patches(z)[:, K_p])
    a, y = kernel.patches(x), dense_output(x, w, kernel, 1)
    torch.testing.assert_close(y, a @ w.reshape(7, -1).T)
    load_builtin()
    lam, Gz = 1e-2, b.T @ b
    r = lam * torch.diagonal(Gz).mean()
    U = torch.eye(45, dtype=torch.float64)[:, K_p]
    B_p = (a.T @ b + r * U) @ torch.linalg.inv(Gz + r * torch.eye(27, dtype=torch.float64))
    stats = SlotStats(Gz, y.T @ b, None, None, None, b.shape[0])
    W_new, offset, _ = COMPENSATORS["grail"](stats, output_map(w, K_p), lam)
    torch.testing.assert_close(W_new, w.reshape(7, -1) @ B_p)
    assert offset is None


def test_new_columns_replace_a_slots_columns_and_the_shift_is_taken_as_it_is():
    cols = torch.randn(7, 5, 1, 9)
    new = torch.randn(7, 27, dtype=torch.float64)
    torch.testing.assert_close(map_columns(cols, NewColumns(new)), new.reshape(7, 3, 1, 9).float())
    fold = Fold(new, offset=torch.arange(7.0), columns=True)
    assert fold_map(fold, ChannelMap.select(torch.tensor([0, 2, 3]), 5)).columns is new
    assert fold_shift(None, None, None, None, fold).tolist() == list(range(7))


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """Spatially correlated inputs (blurred noise): neighbouring pixels carry information about each other."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 20, 20, generator=g)
    return F.avg_pool2d(x, 5, stride=1, padding=2)


def test_taps_reconstruct_closer_to_the_dense_model_than_one_map_for_all_taps():
    torch.manual_seed(0)
    model = TwoConvs().eval()
    calib = list(_smooth_images(96, 0).split(32))
    held = _smooth_images(32, 1)
    outputs = {}
    for solve in ("channels", "taps"):
        result = grailc.compress(model, calib=calib, ratio=0.5, kernel_solve=solve, calib_held_out=1,
                                 measure_latency=False, onnx=False)
        assert result.report["recipe"]["kernel_solve"] == solve
        assert result.report.get("kernel_taps", []) == (["conv2d_1"] if solve == "taps" else [])
        outputs[solve] = result.module(held)
        group = next(g for g in result.report["groups"] if g["kept"] < g["size"])
        assert group["recon_error_grail"] < group["recon_error_plain"]
    with torch.no_grad():
        dense = model(held)
    err = {s: float((y - dense).norm() / dense.norm()) for s, y in outputs.items()}
    assert err["taps"] < 0.9 * err["channels"], err  # measured: 0.163 against 0.195


def test_taps_need_sequential_calibration():
    try:
        Recipe(kernel_solve="taps", sequential=False).validate()
    except RecipeError as e:
        assert "needs sequential calibration" in str(e)
    else:
        raise AssertionError("taps with one-shot calibration was accepted")
    assert Recipe(sequential=False).resolved().kernel_solve == "channels"
    assert Recipe().resolved().kernel_solve == "taps"
