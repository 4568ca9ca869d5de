import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# random-weight networks drift into subnormal floats, which are very slow on CPUs; they change nothing here
torch.set_flush_denormal(True)


@pytest.fixture
def one_thread():
    """Tiny windows train fastest on one thread (two threads on two busy cores were 15x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
