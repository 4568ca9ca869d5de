"""Pass infrastructure: a pipeline is a list of pass names (data, not code).

A pass declares the analyses it ``requires`` and, when it changes the graph, the ones it ``preserves``. The
manager computes missing analyses, times each pass, lints and recompiles a changed graph, and drops analyses the
pass did not preserve. A failure that is not already a clear :class:`GrailcError` is wrapped with the pass name.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from grailc.context import Context
from grailc.errors import GrailcError, check_choice


class Pass:
    name: str = ""
    requires: tuple[str, ...] = ()
    preserves: tuple[str, ...] = ()
    changes_graph: bool = False

    def run(self, ctx: Context) -> None:  # pragma: no cover - interface
        raise NotImplementedError


PASSES: dict[str, Pass] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    PASSES[cls.name] = cls()
    return cls


def _analyse_deps(ctx: Context) -> None:
    from grailc.analysis import analyse
    from grailc.recipe import TARGETS

    ctx.deps = analyse(ctx.gm, value_dims="vdims" in {TARGETS[t] for t in ctx.recipe.targets})
    exclude_groups(ctx)


ANALYSES: dict[str, Callable[[Context], None]] = {"deps": _analyse_deps}


def exclude_groups(ctx: Context) -> None:
    """Pin the groups that are not among the recipe's targets or whose producers match an exclusion pattern."""
    from fnmatch import fnmatchcase

    from grailc.recipe import TARGETS

    targets = {TARGETS[t] for t in ctx.recipe.targets}
    for g in ctx.deps.groups.values():
        if g.prunable and g.target not in targets:
            why = f" ({g.lossy})" if g.lossy else ""
            g.pinned = f"not a target: {g.target} groups are pruned with --targets {g.target}{why}"
        for pattern in ctx.recipe.exclude:
            if g.prunable and any(fnmatchcase(m, pattern) for m in g.modules()):
                g.pinned = f"excluded by recipe pattern {pattern!r}"


class PassError(GrailcError):
    """An unexpected failure inside a pass: a bug in grailc, reported with the pass name."""

    exit_code = 4


def run_pipeline(ctx: Context, names: list[str]) -> None:
    _load_passes()
    for name in names:
        check_choice("pass", name, PASSES)
    for name in names:
        p = PASSES[name]
        for analysis in p.requires:
            if getattr(ctx, analysis) is None:
                ANALYSES[analysis](ctx)
        start = time.perf_counter()
        try:
            p.run(ctx)
        except (GrailcError, KeyboardInterrupt):
            raise
        except Exception as e:  # wrap with the pass name; the traceback stays attached for --debug
            raise PassError(
                f"pass {name!r} failed: {type(e).__name__}: {e}",
                fix="this is a bug in grailc: rerun with --debug and report the traceback",
            ) from e
        finally:
            ctx.timings[name] = round(ctx.timings.get(name, 0.0) + time.perf_counter() - start, 4)
        if p.changes_graph:
            ctx.gm.graph.lint()
            ctx.gm.recompile()
            for analysis in ANALYSES:
                if analysis not in p.preserves:
                    setattr(ctx, analysis, None)


def _load_passes() -> None:
    """Import the pass modules so that they register themselves."""
    import grailc.passes.analyse  # noqa: F401
    import grailc.passes.apply  # noqa: F401
    import grailc.passes.calibrate  # noqa: F401
    import grailc.passes.compensate  # noqa: F401
    import grailc.passes.reconstruct  # noqa: F401
    import grailc.passes.repair  # noqa: F401
    import grailc.passes.select  # noqa: F401
    import grailc.passes.verify  # noqa: F401
