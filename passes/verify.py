"""Verify: every compile checks itself before anything is written.

1. keep-all identity: the same rewrite with every channel kept must reproduce the original outputs
   (relative error under ``recipe.keep_all_tol``);
2. the relative output error ||y - y_ref|| / ||y_ref|| of the compressed model on held-out batches (and top-1
   agreement for classifiers), which must be finite.

A failure raises :class:`VerificationError`; the report still gets the figures.
"""

from __future__ import annotations

import copy

import torch
from grailc.passes.apply import rewrite

from grailc.context import Decision
from grailc.errors import VerificationError
from grailc.metrics import output_error
from grailc.passmanager import Pass, register_pass


def keep_all_error(reference, deps, batches) -> float:
    """Output error of the rewrite with every prunable group kept whole (selection maps = identity)."""
    twin = copy.deepcopy(reference)
    keep_all = {g.id: Decision(torch.arange(g.size)) for g in deps.prunable()}
    rewrite(twin, deps, keep_all, {})
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
            err = keep_all_error(ctx.reference, deps, batches[:1])
            checks["keep_all_error"] = err
            if not err <= ctx.recipe.keep_all_tol:
                raise VerificationError(
                    f"keeping every channel does not reproduce the original outputs (relative error {err:.3g} > "
                    f"{ctx.recipe.keep_all_tol:g})",
                    fix="the rewrite is wrong for this model: report it with --debug output",
                )
        ctx.report["output_error"] = out = output_error(ctx.reference, ctx.gm, batches)
        out["held_out_batches"] = len(ctx.held_out)
        if not torch.isfinite(torch.tensor(out["relative_l2"])):
            raise VerificationError("the compressed model's output error is not finite (NaN/Inf outputs)")
