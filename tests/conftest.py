import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
# random-weight networks drift into subnormal floats, which are very slow on CPUs; they change nothing here
torch.set_flush_denormal(True)
