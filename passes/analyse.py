"""Analyse: the channel-group analysis as a pass (see :mod:`grailc.analysis`), with the recipe's exclusions."""

from __future__ import annotations

from grailc.passmanager import ANALYSES, Pass, register_pass


@register_pass
class Analyse(Pass):
    name = "analyse"

    def run(self, ctx) -> None:
        ANALYSES["deps"](ctx)
