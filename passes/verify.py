"""Verify: every compile checks itself before anything is written.

1. permutation check: the same rewrite with every understood group's units kept but randomly permuted (heads as
   whole heads) must reproduce the original outputs (relative error under ``recipe.keep_all_tol``). Keeping
   channels in order would make every slice the identity and hide a carrier the analysis missed; a permutation
   moves every channel, so a missed BatchNorm, per-channel parameter or index map shows up as an error. It is a
   check of structure, not of statistics: it runs on the first ``PERMUTATION_SAMPLES`` samples of one batch (the
   whole batch when the graph's batch size is fixed);
2. the relative output error ||y - y_ref|| / ||y_ref|| of the compressed model on held-out batches (and top-1
   agreement for classifiers), which must be finite.

A failure raises :class:`VerificationError`; the report still gets the figures.
"""

from __future__ import annotations

import copy

import torch
from grailc.passes.apply import rewrite

from grailc.channel_map import ChannelMap
from grailc.context import Decision
from grailc.errors import VerificationError
from grailc.metrics import output_error
from grailc.passmanager import Pass, register_pass
from grailc.trace import static_batch

PERMUTATION_SAMPLES = 2


def permuted_decisions(deps, seed: int = 0) -> dict:
    """A random permutation of the units of every group the analysis follows completely (pinned by the recipe or
    not); groups of one unit are left alone."""
    g = torch.Generator().manual_seed(seed)
    return {grp.id: Decision(ChannelMap.select(torch.randperm(grp.size, generator=g), grp.size))
            for grp in deps.groups.values() if grp.understood and grp.size > 1}


def permutation_error(reference, deps, batches, seed: int = 0) -> float:
    """Output error of the rewrite with every understood group kept whole but permuted."""
    twin = copy.deepcopy(reference)
    rewrite(twin, deps, permuted_decisions(deps, seed), {})
    twin.recompile()
    return output_error(reference, twin, batches)["relative_l2"]


@register_pass
class Verify(Pass):
    name = "verify"

    def run(self, ctx) -> None:
        batches = ctx.held_out or [ctx.example]
        deps = ctx.applied_deps
        checks = ctx.report.setdefault("verification", {})
        if deps is not None:
            sample = batches[0] if static_batch(ctx.reference) else tuple(t[:PERMUTATION_SAMPLES] for t in batches[0])
            err = permutation_error(ctx.reference, deps, [sample])
            checks["permutation_error"] = err
            checks["permuted_groups"] = len(permuted_decisions(deps))
            if not err <= ctx.recipe.keep_all_tol:
                raise VerificationError(
                    f"keeping every channel in a random order does not reproduce the original outputs (relative "
                    f"error {err:.3g} > {ctx.recipe.keep_all_tol:g}): the analysis missed a use of some channels",
                    fix="this is a bug in grailc's op tables for this model: report it with the --debug output; "
                    "meanwhile exclude the affected modules with a recipe 'exclude' pattern",
                )
        ctx.report["output_error"] = out = output_error(ctx.reference, ctx.gm, batches)
        out["held_out_batches"] = len(ctx.held_out)
        if not torch.isfinite(torch.tensor(out["relative_l2"])):
            raise VerificationError("the compressed model's output error is not finite (NaN/Inf outputs)")
