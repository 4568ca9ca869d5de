"""Reusing a traced graph for modules built alike (grailc.trace_reuse.Traces): the decoder layers of an LLM are traced
once; a module that differs in its tensors, attributes or output is traced anew; the template is never changed by
a compile."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import grailc
import grailc.trace
from grailc.api import make_recipe
from grailc.llm.layerwise import DecoderBlock, compress_layers
from grailc.trace import capture
from grailc.trace_reuse import Template, Traces


def tiny_llama(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def windows():
    return torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def count_traces(monkeypatch):
    """The number of torch.export traces so far (a list, to be read after the work)."""
    calls = []
    real = grailc.trace.trace

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(grailc.trace, "trace", counted)
    return calls


def compress_all(model):
    recipe = make_recipe(ratio=0.5, targets=["mlp", "heads"], calib_batch_size=4)
    return compress_layers(model, windows(), recipe)


def test_identical_layers_are_traced_once_and_compress_bit_for_bit(count_traces, monkeypatch, one_thread):
    reused, traced = tiny_llama(), tiny_llama()
    report = compress_all(reused)
    assert len(count_traces) == 1
    assert [layer["graph"] for layer in report["layers"]] == ["traced", "reused", "reused"]
    count_traces.clear()
    monkeypatch.setattr(Traces, "reuse", lambda self, *args: None)  # every layer traced, as before
    compress_all(traced)
    assert len(count_traces) == 3
    a, b = reused.state_dict(), traced.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert reused.model.layers[2].mlp.down_proj.in_features == 48


def test_a_layer_of_other_widths_is_traced_anew(count_traces, one_thread):
    model = tiny_llama()
    mlp = model.model.layers[1].mlp  # layer 1 narrowed to 80 channels before the run
    from grailc.llm.hf import replace_parameter

    for name in ("gate_proj", "up_proj"):
        replace_parameter(mlp, f"{name}.weight", getattr(mlp, name).weight.detach()[:80].clone())
    replace_parameter(mlp, "down_proj.weight", mlp.down_proj.weight.detach()[:, :80].clone())
    report = compress_all(model)
    graphs = [layer["graph"] for layer in report["layers"]]
    assert len(count_traces) == 2  # layer 2 is built like layer 0 again: its graph is reused
    assert graphs[0] == "traced" and graphs[2] == "reused"
    assert graphs[1].startswith("traced (tensor layer.mlp.gate_proj.weight: parameter [80, 64]")
    assert [layer["after"]["intermediate_size"] for layer in report["layers"]] == [48, 40, 48]


def test_layers_of_another_attention_type_are_traced_anew(count_traces):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         use_sliding_window=True, sliding_window=8, max_window_layers=1,
                         layer_types=["full_attention", "sliding_attention", "full_attention"])
    model = Qwen2ForCausalLM(config).eval()
    traces, x = Traces(), torch.randn(2, 16, 64)
    for layer in model.model.layers:
        capture(DecoderBlock(layer, model.model.rotary_emb), [(1, 16, 64)], data=(x,), traces=traces)
        if layer.self_attn.layer_type == "sliding_attention":
            assert traces.last.startswith("traced (attribute layer.") and "differs" in traces.last
    assert len(count_traces) == 2 and traces.reused == 1


class Net(nn.Module):
    def __init__(self, hidden: int = 16, eps: float = 1e-5, layer_idx: int = 0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, hidden), nn.Linear(hidden, 4)
        self.eps, self.layer_idx = eps, layer_idx

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)) + self.eps)


class ScaledByDepth(Net):
    """Reads ``layer_idx``, which the comparison of attributes leaves out: the output check catches it."""

    def forward(self, x):
        return super().forward(x) / (self.layer_idx + 1)


class WithConstant(Net):
    """A plain tensor attribute: the trace bakes it in as a constant, so the graph is not kept for reuse."""

    def __init__(self):
        super().__init__()
        self.scale = torch.full((4,), 2.0)

    def forward(self, x):
        return super().forward(x) * self.scale


class MadeActivation(Net):
    """An activation made per module, as transformers' GELU modules make theirs: a partial of gelu, or a method
    bound to the module itself; two modules compare equal when these are made alike."""

    def __init__(self, approximate: str = "tanh", bound: bool = False):
        super().__init__()
        self.act = self._gelu if bound else functools.partial(nn.functional.gelu, approximate=approximate)
        self.approximate = approximate

    def _gelu(self, x):
        return nn.functional.gelu(x, approximate=self.approximate)

    def forward(self, x):
        return self.act(super().forward(x))


def net(cls=Net, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(**kw).eval()


def traced(module, traces=None):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    return capture(module, [(1, 8)], data=(x,), traces=traces)


def test_rebinding_to_another_name_or_shape_is_refused():
    gm, example = traced(net())
    template = Template.of(gm, net(), [(1, 8)], example)
    assert template.mismatch(net(seed=1)) is None
    bound = template.bind(net(seed=1))
    assert bound.get_parameter("fc1.weight") is not None

    renamed = net()
    renamed.first = renamed.fc1
    del renamed.fc1
    assert template.mismatch(renamed).startswith("tensor fc1.weight: absent != traced parameter [16, 8]")
    with pytest.raises(ValueError, match="does not fit"):
        template.bind(renamed)

    wider = net(hidden=24)
    assert "fc1.weight: parameter [24, 8] torch.float32 on cpu != traced parameter [16, 8]" in template.mismatch(wider)
    with pytest.raises(ValueError, match="does not fit"):
        template.bind(wider)
    assert "float64" in template.mismatch(net().double())
    assert template.mismatch(net(eps=1e-6)) == "attribute eps differs from the traced module's"
    assert template.mismatch(net(), shapes=[(1, 9)]).startswith("input shapes")


def test_reuse_binds_the_modules_own_tensors_and_leaves_the_template_alone():
    traces = Traces()
    first, second = net(), net(seed=1)
    traced(first, traces)
    template = traces.templates[0]
    code = template.graph.code
    gm, example = traced(second, traces)
    assert traces.last == "reused" and (traces.traced, traces.reused) == (1, 1)
    assert gm.get_parameter("fc1.weight") is second.fc1.weight  # as a new trace binds them
    torch.testing.assert_close(gm(*example), second(*example), rtol=0, atol=0)

    calib = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    plain = grailc.compress(copy.deepcopy(second), calib=calib, ratio=0.5, calib_held_out=1)
    reused = grailc.compress(copy.deepcopy(second), calib=calib, ratio=0.5, calib_held_out=1, traces=traces)
    assert traces.last == "reused"
    a, b = plain.module.state_dict(), reused.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert template.graph.code == code  # the compile rewrote a copy
    assert all(t.device.type == "meta" for t in template.graph.state_dict().values())


def test_a_module_that_reads_its_layer_index_is_traced_anew(count_traces):
    traces = Traces()
    traced(net(ScaledByDepth, layer_idx=0), traces)
    traced(net(ScaledByDepth, layer_idx=1), traces)
    assert traces.last == "traced (its output on the example differs from the module's)"
    assert len(count_traces) == 2


def test_a_graph_with_baked_in_constants_is_not_reused(count_traces):
    traces = Traces()
    traced(net(WithConstant), traces)
    traced(net(WithConstant, seed=1), traces)
    assert traces.templates == [] and len(count_traces) == 2 and traces.last == "traced"


def test_activations_made_per_module_compare_by_what_they_compute(count_traces):
    for bound in (False, True):
        traces = Traces()
        traced(net(MadeActivation, bound=bound), traces)
        traced(net(MadeActivation, seed=1, bound=bound), traces)
        assert traces.last == "reused"
    gm, example = traced(net(MadeActivation))
    template = Template.of(gm, net(MadeActivation), [(1, 8)], example)
    exact = net(MadeActivation, approximate="none")
    assert template.mismatch(exact) == "attribute act differs from the traced module's"
