"""One intra-op thread for these tests: their models are tiny, and on a busy machine thread hand-offs cost more
than the convolutions themselves (a compile takes ~20x longer with two contended threads)."""

from __future__ import annotations

import pytest
import torch

from .helpers import save_pt2, tiny


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_pt2(tmp_path_factory):
    """A tiny CNN saved as a .pt2 file."""
    return save_pt2(tiny(), tmp_path_factory.mktemp("model") / "tiny.pt2")
