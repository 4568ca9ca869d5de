"""Selector formulas on hand-made statistics."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from grailc.passes.select.slimgpt import DAMP, _SlotState

from grailc.channels import Layout, Segment
from grailc.groups import Consumer, Slot


def _ctx_and_slot(W: torch.Tensor, G: torch.Tensor, per_unit: int = 1):
    layout = Layout(-1, (Segment(0, W.shape[1]),))
    slot = Slot(Consumer("k", "", "linear", "w", 0, layout), 0, 0, W.shape[1], per_unit)
    gm = torch.nn.Module()
    gm.register_parameter("w", torch.nn.Parameter(W.clone(), requires_grad=False))
    return SimpleNamespace(grams={slot.key: G}, gm=gm), slot


def _compensated_error(W, H, keep):
    """min_B tr(W (x - B x_K)(..)^T W^T) summed over data with Gram H: tr(W (H - H[:, K] H[K, K]^-1 H[K, :]) W^T)."""
    rest = H - H[:, keep] @ torch.linalg.solve(H[keep][:, keep], H[keep])
    return float(torch.einsum("ij,jk,ik->", W, rest, W))


def test_obs_scores_are_the_compensated_error_of_removing_each_unit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    G, W = x.T @ x, torch.randn(4, 6, generator=g, dtype=torch.float64)
    H = G + DAMP * torch.diagonal(G).mean() * torch.eye(6, dtype=torch.float64)
    for per_unit in (1, 2):
        ctx, slot = _ctx_and_slot(W, G, per_unit)
        state = _SlotState(ctx, slot)
        n = 6 // per_unit
        expected = []
        for u in range(n):
            keep = torch.tensor([c for c in range(6) if c // per_unit != u])
            expected.append(_compensated_error(W, H, keep) / state.total)
        torch.testing.assert_close(state.scores(), torch.tensor(expected, dtype=torch.float64))


def test_obs_update_after_a_removal_matches_a_fresh_start():
    """Removing unit 2 and updating W and Hinv gives the scores of the remaining units computed from scratch on
    the error left (the greedy step is exact)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    G, W = x.T @ x, torch.randn(3, 5, generator=g, dtype=torch.float64)
    H = G + DAMP * torch.diagonal(G).mean() * torch.eye(5, dtype=torch.float64)
    ctx, slot = _ctx_and_slot(W, G)
    state = _SlotState(ctx, slot)
    base = _compensated_error(W, H, torch.tensor([0, 1, 3, 4]))
    state.remove([2])
    for position, unit in enumerate([0, 1, 3, 4]):
        keep = torch.tensor([c for c in (0, 1, 3, 4) if c != unit])
        torch.testing.assert_close(float(state.scores()[position]) * state.total,
                                   _compensated_error(W, H, keep) - base)


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(6, 10), torch.nn.Linear(10, 4)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def test_wanda_pp_is_the_regional_gradient_score_of_the_consumer_columns():
    """Independently of the graph: per-sample autograd on the eager module, G = RMS over samples of
    d||f(x_n)||_2 / dW_down, score_c = sum_o (alpha G_oc + ||h_c||_2) |W_oc| normalised."""
    from grailc.passes.select.wanda import wanda
    from grailc.passes.select.wanda_pp import ALPHA, wanda_pp, wanda_pp_scores

    from grailc.api import make_recipe
    from grailc.llm.layerwise import layer_statistics

    torch.manual_seed(0)
    block = _Mlp().eval()
    batches = [torch.randn(3, 5, 6) for _ in range(2)]  # 6 samples of 5 tokens
    ctx = layer_statistics(block, batches, make_recipe(ratio=0.5, selector="wanda_pp", targets=["mlp"]))
    (group,) = ctx.deps.prunable()
    assert group.size == 10
    sq, hidden_sq = torch.zeros(4, 10), torch.zeros(10)
    for x in torch.cat(batches):
        block.zero_grad()
        block(x[None]).norm().backward()
        sq += block.down.weight.grad**2
        with torch.no_grad():
            hidden_sq += torch.nn.functional.gelu(block.up(x)).pow(2).sum(0)
    G, W = (sq / 6).sqrt(), block.down.weight.detach().abs()
    s = ((ALPHA * G + hidden_sq.sqrt()) * W).sum(0)
    expected = (s / s.sum()).double()
    got = wanda_pp(ctx, group)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)
    # the gradient term is what differs from wanda_sp: with alpha = 0 the score is wanda's, and it is not here
    plain = wanda(ctx, group)
    torch.testing.assert_close(wanda_pp_scores(ctx, group, 0.0), plain)
    assert (got - plain).abs().max() > 1e-3


def test_multiple_of_auto_rounds_wide_groups_to_eight_and_keeps_narrow_ones_exact():
    """auto: 8 in groups at least 64 channels wide (units x channels per unit), exact below; a fixed multiple
    everywhere; a head of 64 channels is already a multiple of 8, so heads step one at a time."""
    from grailc.passes.select import n_keep, resolve_multiple, unit_step

    def group(size, granule=1):
        return SimpleNamespace(size=size, granule=granule)

    assert [resolve_multiple("auto", w) for w in (16, 63, 64, 2048)] == [1, 1, 8, 8]
    assert resolve_multiple(1, 2048) == 1 and resolve_multiple(16, 8) == 16
    assert n_keep(96, 0.3, unit_step(group(96), "auto")) == 64  # round(67.2) = 67 -> 64
    assert n_keep(40, 0.3, unit_step(group(40), "auto")) == 28  # narrow: exact
    assert n_keep(96, 0.3, unit_step(group(96), 1)) == 67
    assert unit_step(group(12, 64), "auto") == 1 and unit_step(group(16, 6), "auto") == 4  # 4 heads of 6 = 24
    assert n_keep(64, 0.95, unit_step(group(64), "auto")) == 8  # at least one step
