"""Named selectors and compensators. Recipes refer to them by name; plug-ins register with a decorator.

* selector:    (group, stats, n_keep, recipe) -> kept channel indices (sorted LongTensor) and scores
* compensator: (G, keep, lam, cross=None) -> (map B [size, k] to merge into a consumer, or None for plain
  pruning; the solver fallback used or None)
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
    import grailc.passes.compensate.grail  # noqa: F401
    import grailc.passes.select.magnitude  # noqa: F401
    import grailc.passes.select.wanda  # noqa: F401
