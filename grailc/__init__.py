"""grailc: structured compression of trained PyTorch models with GRAIL, as a graph-rewriting compiler."""

__version__ = "0.1.0"

from grailc.api import Result, compress  # noqa: E402

__all__ = ["Result", "compress", "__version__"]
