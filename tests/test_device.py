"""Moving a traced graph to another device (grailc/device.py): parameters, buffers, tensor constants and the device
arguments the trace baked into its nodes. The meta device stands in for a GPU here: a node left on the CPU would
fail to mix with meta tensors."""

from __future__ import annotations

import torch
from torch import nn

from grailc.device import exact_float32, inputs_to, move_graph
from grailc.trace import capture


class Positions(nn.Module):
    """Builds a tensor on its input's device inside forward (traced as ``arange(..., device=cpu)``) and reads a
    buffer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("scale", torch.full((6,), 0.5))

    def forward(self, x):
        return self.fc(x) * self.scale + torch.arange(x.shape[-1], device=x.device, dtype=x.dtype)


def test_a_graph_moves_to_another_device():
    torch.manual_seed(0)
    module = Positions().eval()
    gm, example = capture(module, [(2, 6)])
    assert any(isinstance(v, torch.device) for n in gm.graph.nodes for v in n.kwargs.values())
    expected = gm(*example)
    moved = move_graph(gm, torch.device("meta"))
    (x,) = inputs_to([example], torch.device("meta"))[0]
    out = moved(x)
    assert out.device.type == "meta" and out.shape == expected.shape
    assert all(t.device.type == "meta" for t in moved.state_dict().values())
    assert module.fc.weight.device.type == "cpu"  # the traced module itself is left where it was


def test_exact_float32_changes_nothing_off_a_gpu_and_restores_what_it_changes():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with exact_float32(torch.device("cpu")):
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == saved
    with exact_float32(torch.device("cuda")):  # only flags: nothing runs on a GPU here
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == saved
