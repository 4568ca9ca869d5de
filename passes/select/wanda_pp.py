"""Wanda++ (Yang et al., 2025): the regional gradient score (RGS), structured. The only selector that backpropagates.

Per calibration sample x_n (one row of a batch: a token window on the ``hf:`` path, an image elsewhere) the
*regional loss* is the l2 norm of the region's output, L_n = ||f(x_n)||_2, and its gradient with respect to every
consumer weight is taken by backprop through the region; the per-weight gradient magnitude is its root mean square
over the N samples,

    G_oc = sqrt( (1/N) sum_n (dL_n / dW_oc)^2 ).

Wanda++ scores a weight S_oc = (alpha * G_oc + ||x_c||_2) * |W_oc| (alpha = 100 as in the paper; ``||x_c||_2`` the
norm of input channel c over every calibration row, sqrt(G_cc) from the consumer's Gram, as ``wanda`` reads it).
Structured, a channel c of a consumer scores the sum of its column, sum_o S_oc (every kernel tap a row), normalised
per consumer (divided by the consumer's total) and summed over the consumers of its group and over a head's
channels, exactly as ``wanda_sp`` aggregates |W| * ||x||. With alpha = 0 it *is* ``wanda_sp``.

Which weights: only the consumers' (down_proj, o_proj: the columns that read the channels), as Wanda-SP scores
them; the producer rows removed with a channel (gate / up, q / k / v) are not scored.

The *region* is the graph handed to :func:`grailc.compress`: on the ``hf:`` path that is one decoder layer (the
paper's decoder block), fed the outputs of the already compressed layers before it; for a CNN or ViT it is the whole
model, so L_n is the norm of its logits. Gradients are taken on the dense graph (``ctx.gm`` before ``apply``), once
per compile for every consumer (cached in ``ctx.cache``), at the cost of one forward and one backward per sample.
A graph traced with a fixed batch size takes each of its batches as one sample. Data-parallel (``torchrun``), each
process takes its share of the samples and the sums of squares and the sample count are summed over the processes.

The second half of Wanda++, regional optimisation (RO: after pruning, a few RMSprop steps on the block's weights to
match the dense block's output), is the ``reconstruct`` pass with ``reconstruct = "layer"`` and
``reconstruct_optimizer = "rmsprop"``: ``grailc compress hf:... --selector wanda_pp`` turns it on with
:data:`RO_SETTINGS` unless ``--reconstruct`` (or a recipe) says otherwise. It runs after GRAIL's compensation (select
-> compensate -> apply -> reconstruct), so RO starts from the compensated block.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

from grailc.distributed import all_reduce_stats
from grailc.errors import CalibrationError
from grailc.registry import selector
from grailc.surgery import consumer_columns, get_param

ALPHA = 100.0
CACHE_KEY = "wanda_pp.regional_gradients"
# Wanda++'s regional optimisation as the 'reconstruct' pass: the decoder layer is the window, RMSprop, one sample a
# step. The paper: 5 iterations x 32 samples (160 single-sample steps) at lr 3e-7 (fp16 LLaMA-7B); on SmolLM2 in
# float32 (8 layers, MLP at 50%) lr 3e-7 / 1e-5 / 1e-4 / 3e-4 gave perplexity 40.04 / 38.96 / 38.11 / 39.84 from
# 39.59 without RO (README, Decoder LLMs)
RO_SETTINGS = {"reconstruct": "layer", "reconstruct_optimizer": "rmsprop", "reconstruct_steps": 160,
               "reconstruct_batch": 1, "reconstruct_lr": 1e-4}


def regional_optimisation(recipe, given: set[str]) -> None:
    """Turn on Wanda++'s regional optimisation in ``recipe`` (RO_SETTINGS), leaving the fields in ``given`` (set
    explicitly by the user) as they are."""
    for name, value in RO_SETTINGS.items():
        if name not in given:
            setattr(recipe, name, value)


def _samples(ctx) -> list[tuple]:
    """The calibration inputs one sample at a time (a graph with a fixed batch: one batch at a time)."""
    from grailc.passes.calibrate import batches_for

    from grailc.trace import static_batch

    batches = batches_for(ctx.gm, ctx.calib)
    if not batches:
        raise CalibrationError("wanda_pp needs calibration inputs to take its regional gradients, and none are left "
                               "for fitting", fix="give more calibration batches (or fewer --held-out)")
    if static_batch(ctx.gm) is not None:
        return batches
    return [tuple(t[i : i + 1] for t in batch) for batch in batches for i in range(batch[0].shape[0])]


def _output_norm(out) -> torch.Tensor:
    """||f(x)||_2 over every floating output tensor of the region."""
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise CalibrationError("wanda_pp takes the gradient of the norm of the model's output, but the graph has "
                               "no floating-point output", fix="use --selector wanda_sp (no gradients)")
    return torch.sqrt(sum(t.float().pow(2).sum() for t in leaves))


def regional_gradients(ctx) -> dict[str, torch.Tensor]:
    """G = sqrt(mean_n (dL_n/dW)^2), L_n = ||f(x_n)||_2, for the weight of every consumer of a prunable group
    (keyed by parameter target), on the dense graph ``ctx.gm``; computed once per compile."""
    cached = ctx.cache.get(CACHE_KEY)
    if cached is not None:
        return cached
    gm = ctx.gm
    targets = sorted({slot.consumer.weight for g in ctx.deps.prunable() for slot in g.consumers})
    weights = {t: get_param(gm, t).detach().clone().requires_grad_(True) for t in targets}
    sq = {t: torch.zeros_like(w, dtype=torch.float32) for t, w in weights.items()}
    dtype = next((p.dtype for p in gm.parameters()), torch.float32)
    samples = _samples(ctx)
    # only the scored weights take gradients: the graph's own parameters are frozen meanwhile
    flags = [(p, p.requires_grad) for p in gm.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for x in samples:
            x = tuple(t.to(dtype) if t.is_floating_point() else t for t in x)
            with torch.enable_grad():
                loss = _output_norm(torch.func.functional_call(gm, weights, x, strict=False))
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for t, g in zip(weights, grads):
                if g is not None:
                    sq[t] += g.detach().float().pow(2)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    # data-parallel: each process summed over its share of the samples; the sums and the count are summed over all
    summed = all_reduce_stats({**{("sq", t): s for t, s in sq.items()}, ("samples", ""): len(samples)})
    count = summed[("samples", "")]
    found = {t: (summed[("sq", t)] / count).sqrt().cpu() for t in sq}  # held on the CPU, like the scores
    bad = next((t for t, g in found.items() if not bool(torch.isfinite(g).all())), None)
    if bad is not None:
        raise CalibrationError(f"wanda_pp: the regional gradient of {bad} is not finite",
                               fix="check the calibration data's scale, or use --selector wanda_sp")
    ctx.cache[CACHE_KEY] = found
    return found


def wanda_pp_scores(ctx, group, alpha: float = ALPHA) -> torch.Tensor:
    """Per unit: sum over consumers of normalised sum_o (alpha * G_oc + ||x_c||_2) * |W_oc|, over a unit's channels."""
    grads = regional_gradients(ctx) if alpha else {}
    score = torch.zeros(group.size, dtype=torch.float64)
    for slot in group.consumers:
        w = consumer_columns(get_param(ctx.gm, slot.consumer.weight), slot, torch.float64).abs().cpu()
        norms = torch.diagonal(ctx.grams[slot.key]).to("cpu", torch.float64).clamp_min(0).sqrt()
        per_weight = norms.unsqueeze(0).expand_as(w)
        if alpha:
            per_weight = per_weight + alpha * consumer_columns(grads[slot.consumer.weight], slot, torch.float64)
        s = slot.to_units((per_weight * w).sum(0))
        score += s / s.sum().clamp_min(1e-300)
    return score


@selector("wanda_pp")
def wanda_pp(ctx, group) -> torch.Tensor:
    return wanda_pp_scores(ctx, group)
