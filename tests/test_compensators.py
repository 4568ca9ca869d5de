"""The formulas behind the random selector, the first moments of calibration, the bias compensators, the affine
reconstruction error and BatchNorm repair."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from grailc.passes.calibrate import GraphOrder, Resumable, products, record_consumer_inputs, record_grams
from grailc.passes.compensate import recon_error
from grailc.passes.compensate.bias import mean_shift
from grailc.passes.compensate.grail import affine_ridge_map, grail_bias, ridge_map
from grailc.passes.repair import batch_norms, repair_batch_norms
from grailc.passes.select.random import random_units
from graph_checks import traced
from torch import nn

import grailc
from grailc.channel_map import ChannelMap
from grailc.context import SlotStats
from grailc.recipe import Recipe
from grailc.surgery import get_param, offset_shift, tap_coverage


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


def batches(shape, count=4, shift=1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) + shift for _ in range(count)]


def hidden_group(deps):
    return next(g for g in deps.prunable() if g.size == 16)


def stats_from(x: torch.Tensor, z: torch.Tensor) -> SlotStats:
    x, z = x.to(torch.float64), z.to(torch.float64)
    return SlotStats(z.T @ z, x.T @ z, x.T @ x, z.sum(0), x.sum(0), x.shape[0])


def test_random_selector_is_seeded_by_recipe_and_group():
    def scores(seed, gid):
        recipe = Recipe()
        recipe.calib.seed = seed
        return random_units(SimpleNamespace(recipe=recipe), SimpleNamespace(id=gid, size=10))

    assert torch.equal(scores(0, 3), scores(0, 3))
    assert not torch.equal(scores(0, 3), scores(0, 4)) and not torch.equal(scores(0, 3), scores(1, 3))
    assert scores(0, 3).shape == (10,) and scores(0, 3).dtype == torch.float64


def test_one_shot_sums_are_first_moments():
    model = mlp()
    gm, deps = traced(model, (1, 6))
    data = batches((8, 6))
    sums = {}
    grams, rows = record_grams(gm, [hidden_group(deps)], [(x,) for x in data], sums=sums)
    (key,) = grams
    h = torch.cat([F.relu(model[0](x)) for x in data]).detach().to(torch.float64)
    assert rows[key] == 32
    torch.testing.assert_close(sums[key] / rows[key], h.mean(0))
    torch.testing.assert_close(grams[key], h.T @ h)


def test_sequential_sums_separate_what_the_model_sees_from_the_dense_target():
    model = mlp()
    gm, deps = traced(model, (1, 6))
    shadow = copy.deepcopy(gm)
    bias = next(n for n, _ in shadow.named_parameters() if n.endswith("0.bias"))
    with torch.no_grad():
        shadow.get_parameter(bias).add_(1.0)
    data = batches((8, 6))
    dense_order, shadow_order = GraphOrder(gm), GraphOrder(shadow)
    runs = [(Resumable(dense_order, (x,)), Resumable(shadow_order, (x,))) for x in data]
    slots = hidden_group(deps).consumers
    found = record_consumer_inputs(runs, slots[0].consumer.node, slots)
    gz, cross, sums, target_sums, rows = (found[k] for k in ("gz", "cross", "sums", "target_sums", "rows"))
    (key,) = gz
    x = torch.cat([F.relu(model[0](b)) for b in data]).detach().to(torch.float64)
    z = torch.cat([F.relu(model[0](b) + 1) for b in data]).detach().to(torch.float64)
    torch.testing.assert_close(sums[key] / rows[key], z.mean(0))
    torch.testing.assert_close(target_sums[key] / rows[key], x.mean(0))
    torch.testing.assert_close(cross[key], x.T @ z)


def test_sequential_products_of_a_selected_group_are_its_kept_block_only():
    model = mlp()
    gm, deps = traced(model, (1, 6))
    data = batches((8, 6))
    order = GraphOrder(gm)
    slots = hidden_group(deps).consumers
    K = torch.tensor([1, 4, 5, 9, 15])
    found = [record_consumer_inputs([(Resumable(order, (x,)), Resumable(order, (x,))) for x in data],
                                    slots[0].consumer.node, slots, kept) for kept in (None, {slots[0].key: K})]
    (key,) = found[0]["gz"]
    full, part = ({name: f[name][key] for name in ("gz", "cross")} for f in found)
    torch.testing.assert_close(part["gz"][K[:, None], K], full["gz"][K[:, None], K])
    torch.testing.assert_close(part["cross"][:, K], full["cross"][:, K])
    rest = torch.ones(16, dtype=torch.bool)
    rest[K] = False
    assert part["cross"][:, rest].abs().max() == 0 and part["gz"][rest].abs().max() == 0
    torch.testing.assert_close(found[1]["sample_gx"][key], found[0]["sample_gx"][key])  # the errors' denominators


def test_sequential_error_sample_holds_every_eighth_row_of_a_large_batch():
    """The reported errors' statistics: Gx, C, Gz and the sums of the same rows, every 8th of a batch of 8 x 256
    rows or more, at least 256 of a smaller one (all rows below 512); the statistics that decide come from all
    rows."""
    model = mlp()
    gm, deps = traced(model, (1, 6))
    order = GraphOrder(gm)
    slots = hidden_group(deps).consumers
    for size, every in ((2048, 8), (600, 2), (511, 1), (40, 1)):
        data = batches((size, 6), count=2)
        found = record_consumer_inputs([(Resumable(order, (x,)), Resumable(order, (x,))) for x in data],
                                       slots[0].consumer.node, slots)
        (key,) = found["gz"]
        x = torch.cat([F.relu(model[0](b))[::every] for b in data]).detach().to(torch.float64)
        assert found["sample_rows"][key] == x.shape[0] and found["rows"][key] == 2 * size
        for name in ("sample_gx", "sample_gz", "sample_cross"):
            torch.testing.assert_close(found[name][key], x.T @ x, rtol=1e-6, atol=1e-6)  # float32 products
        torch.testing.assert_close(found["sample_sums"][key], x.sum(0), rtol=1e-6, atol=1e-6)


def test_affine_recon_error_matches_the_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) + 2
    z = x + 0.1 * torch.randn(200, 6, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3])
    B, c = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    M = torch.randn(4, 6, generator=g, dtype=torch.float64)
    direct = ((x - z[:, keep] @ B.T - c) @ M.T).square().sum() / (x @ M.T).square().sum()
    stats = stats_from(x, z)
    sel = ChannelMap.select(keep, 6)
    assert recon_error(stats, M.T @ M, B, sel, c) == pytest.approx(float(direct), rel=1e-9)
    plain = ((x - z[:, keep] @ sel.U().T) @ M.T).square().sum() / (x @ M.T).square().sum()
    assert recon_error(stats, M.T @ M, sel.U(), sel) == pytest.approx(float(plain), rel=1e-9)
    # B None is plain pruning read by indexing (a selection) or through the spread (a fold): the same figures
    assert recon_error(stats, M.T @ M, None, sel) == pytest.approx(float(plain), rel=1e-9)
    assert recon_error(stats, M.T @ M, None, sel, c) == pytest.approx(recon_error(stats, M.T @ M, sel.U(), sel, c))
    fold = ChannelMap.fold(torch.tensor([0, 1, 1, 2, 0, 2]), 3)
    assert recon_error(stats, M.T @ M, None, fold) == pytest.approx(recon_error(stats, M.T @ M, fold.U(), fold))


def test_bias_moves_the_mean_of_the_removed_channels_and_is_the_best_offset():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100, 5, generator=g, dtype=torch.float64) * torch.arange(1.0, 6.0, dtype=torch.float64)
    keep = torch.tensor([1, 3])
    sel = ChannelMap.select(keep, 5)
    B, c, fallback = mean_shift(stats_from(x, x), sel, 1e-3)
    expected = x.mean(0)
    expected[keep] = 0
    assert B is None and fallback is None
    torch.testing.assert_close(c, expected)
    H = torch.eye(5, dtype=torch.float64)
    best = recon_error(stats_from(x, x), H, sel.U(), sel, c)
    assert best < recon_error(stats_from(x, x), H, sel.U(), sel)
    for d in torch.eye(5, dtype=torch.float64):
        assert best < recon_error(stats_from(x, x), H, sel.U(), sel, c + 0.01 * d)
    stats = stats_from(x, x)
    assert mean_shift(SlotStats(stats.Gz, stats.C, stats.Gx, None, None, 100), sel, 1e-3) == (None, None, None)


def test_grail_bias_is_affine_least_squares_on_the_kept_channels():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 6, generator=g, dtype=torch.float64) + 1.5
    x = z @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 3 + 0.1 * torch.randn(300, 6, generator=g,
                                                                                         dtype=torch.float64)
    keep = torch.tensor([0, 1, 4])
    B, c, _ = affine_ridge_map(stats_from(x, z), ChannelMap.select(keep, 6), 0.0)
    design = torch.cat([z[:, keep], torch.ones(300, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, x).solution  # [k + 1, size]
    torch.testing.assert_close(B, solution[:3].T)
    torch.testing.assert_close(c, solution[3])
    # the ridge pulls B towards plain pruning but never the constant: with a huge ridge B -> I[:, K] and c -> the
    # best offset for it, mean(x - I[:, K] z_K)
    B, c, _ = grail_bias(stats_from(x, z), ChannelMap.select(keep, 6), 1e9)
    plain = ChannelMap.select(keep, 6).U().to(torch.float64)
    torch.testing.assert_close(B, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(c, (x - z[:, keep] @ plain.T).mean(0), atol=1e-5, rtol=0)


def test_grail_ridge_pulls_towards_plain_pruning():
    """B[K] = I at every lam (kept channels pass through); lam -> inf gives plain pruning; lam = 0 least squares."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3])
    G = x.T @ x
    for lam in (0.0, 0.1, 10.0):
        B, _ = ridge_map(G, ChannelMap.select(keep, 5), lam)
        torch.testing.assert_close(B[keep], torch.eye(3, dtype=torch.float64))
    B, _ = ridge_map(G, ChannelMap.select(keep, 5), 1e12)
    torch.testing.assert_close(B, ChannelMap.select(keep, 5).U().to(torch.float64), atol=1e-8, rtol=0)
    B, _ = ridge_map(G, ChannelMap.select(keep, 5), 0.0)
    torch.testing.assert_close(B, torch.linalg.lstsq(x[:, keep], x).solution.T)


def test_tap_coverage_gives_the_mean_output_of_a_constant_input():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).eval()
    gm, deps = traced(nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), conv, nn.ReLU(), nn.Conv2d(4, 2, 1)), (1, 2, 4, 4))
    consumer = next(c for c in deps.consumers if c.kind == "conv" and get_param(gm, c.weight).shape[-1] == 3)
    cov = tap_coverage(gm, consumer).reshape(3, 3)
    torch.testing.assert_close(cov, torch.outer(torch.tensor([0.75, 1, 0.75]), torch.tensor([0.75, 1, 0.75])).double())
    c = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    weight = get_param(gm, consumer.weight)
    mean_out = F.conv2d(c.float()[None, :, None, None].expand(1, 3, 4, 4), weight, padding=1).mean((0, 2, 3))
    torch.testing.assert_close(offset_shift(gm, consumer, weight, torch.arange(3), c).float(), mean_out)


@pytest.mark.parametrize("compensate", ["bias", "grail+bias"])
def test_bias_compensation_keeps_the_mean_output_and_adds_a_missing_bias(compensate):
    model = mlp()
    data = batches((32, 6))
    result = grailc.compress(model, calib=data, ratio=0.5, calib_held_out=0, compensate=compensate, onnx=False)
    x = torch.cat(data)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x).mean(0), model(x).mean(0), atol=1e-5, rtol=0)

    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, bias=False)).eval()
    result = grailc.compress(net, calib=batches((4, 1, 6, 6)), ratio=0.5, calib_held_out=1, compensate=compensate,
                             onnx=False)
    params = dict(result.module.named_parameters())
    assert params["2.bias"].shape == (4,) and params["0.weight"].shape[0] == 4
    assert result.report["compensation_refused"] == 0


class BnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn_b(self.b(F.relu(self.bn_a(self.a(x))))))
        return self.head(x.mean((2, 3)))


def test_repair_sets_each_batch_norm_to_the_statistics_of_its_input():
    data = batches((8, 1, 6, 6))
    result = grailc.compress(BnNet().eval(), calib=data, ratio=0.5, calib_held_out=1, repair=True, onnx=False)
    assert result.recipe.pipeline.index("repair") == result.recipe.pipeline.index("apply") + 1
    report = result.report["repair"]
    assert report["batch_norms"] == 2 and report["batches"] == 3
    gm = result.module
    norms = batch_norms(gm)
    before = {n.args[3].target: get_param(gm, n.args[3].target).clone() for n in norms}
    assert repair_batch_norms(gm, [(x,) for x in data[:3]])["mean_shift_in_std"] < 1e-6  # already repaired
    for n in norms:  # the input of each BatchNorm, on the repaired model, has the stored statistics
        torch.testing.assert_close(get_param(gm, n.args[3].target), before[n.args[3].target])
    a = F.conv2d(torch.cat(data[:3]), get_param(gm, norms[0].args[0].args[1].target), padding=1).double()
    torch.testing.assert_close(get_param(gm, norms[0].args[3].target).double(), a.mean((0, 2, 3)), atol=1e-6, rtol=0)
    torch.testing.assert_close(get_param(gm, norms[0].args[4].target).double(), a.var((0, 2, 3), unbiased=False),
                               atol=1e-5, rtol=1e-5)


def test_repair_without_batch_norm_says_there_is_nothing_to_repair():
    result = grailc.compress(mlp(), calib=batches((8, 6)), ratio=0.5, calib_held_out=1, repair=True, onnx=False)
    assert result.report["repair"]["batch_norms"] == 0
    assert "nothing to repair" in result.report["repair"]["note"]


def test_sequential_errors_are_norms_of_residuals_even_on_few_rows():
    """The reported errors are ||M (x - B z - c)||^2 / ||M x||^2 >= 0: Gx must come from the rows C and Gz come from
    (estimated from a subsample, it made them negative on small calibration sets)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.ReLU(), nn.Conv2d(32, 8, 1)).eval()
    result = grailc.compress(model, calib=batches((2, 3, 6, 6), count=3), ratio=0.5, measure_latency=False,
                             onnx=False, calib_held_out=1)
    errors = [g[k] for g in result.report["groups"] for k in ("recon_error_plain", "recon_error_grail")
              if g.get(k) is not None]
    assert errors and min(errors) >= -1e-9


@pytest.mark.parametrize(("rows", "width"), [(20000, 7), (20000, 512), (20000, 513), (20000, 1100), (1500, 1100)])
def test_products_match_float64_and_are_symmetric(rows, width):
    """a^T a, formed on and above the diagonal only past 512 columns and with at least twice as many rows (then
    exactly symmetric), equals the float64 product to float32 rounding; a^T b is the plain product."""
    g = torch.Generator().manual_seed(width)
    a, b = torch.randn(rows, width, generator=g), torch.randn(rows, 3, generator=g)
    G = products(a)
    assert G.dtype == torch.float64 and (width <= 512 or rows < 2 * width or torch.equal(G, G.T))
    for ours, exact in ((G, a.double().T @ a.double()), (products(a, b), a.double().T @ b.double())):
        assert (ours - exact).abs().max() <= 1e-5 * exact.abs().max()
