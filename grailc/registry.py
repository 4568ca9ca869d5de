"""Named selectors and compensators. Recipes refer to them by name; plug-ins register with a decorator.

* selector:    (ctx, group) -> per-unit scores (the top ones are kept), or a ChannelMap it built itself (a fold)
* compensator: (stats: SlotStats, cmap: ChannelMap, lam) -> (B, c, fallback): the input is approximated as
  x ~ B z' + c from the map's new channels z' = R z; B [size, k] is merged into the consumer (W B; None: the map's
  plain spread W U, W[:, K] for a selection), c [size] into its bias (b + W c; None: no offset, and always None
  when ``stats.sz`` is None); fallback: the solver fallback used or None
"""

from __future__ import annotations

from collections.abc import Callable

SELECTORS: dict[str, Callable] = {}
COMPENSATORS: dict[str, Callable] = {}


def selector(name: str):
    def register(fn):
        SELECTORS[name] = fn
        return fn

    return register


def compensator(name: str):
    def register(fn):
        COMPENSATORS[name] = fn
        return fn

    return register


def load_builtin() -> None:
    """Import the built-in selectors and compensators so that they register."""
    import grailc.passes.compensate.bias  # noqa: F401
    import grailc.passes.compensate.grail  # noqa: F401
    import grailc.passes.select.flap  # noqa: F401
    import grailc.passes.select.fold  # noqa: F401
    import grailc.passes.select.magnitude  # noqa: F401
    import grailc.passes.select.random  # noqa: F401
    import grailc.passes.select.slimgpt  # noqa: F401
    import grailc.passes.select.wanda  # noqa: F401
    import grailc.passes.select.wanda_pp  # noqa: F401
