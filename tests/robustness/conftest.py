"""One intra-op thread for these tests: their models are tiny, and on a busy machine thread hand-offs cost more
than the convolutions themselves (a compile takes ~20x longer with two contended threads)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
