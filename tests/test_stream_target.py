"""compensate_target = "stream": the linear consumers that add into a residual stream rebuild the dense stream
(their dense output plus the stream's drift), on a two-block residual MLP and on decoder layers."""

from __future__ import annotations

import pytest
import torch
from test_trace_reuse import tiny_llama
from torch import nn

import grailc
from grailc.api import make_recipe
from grailc.errors import RecipeError
from grailc.llm.layerwise import compress_layers


class ResidualMLP(nn.Module):
    """Two residual MLP blocks: h + fc2(relu(fc1(h))), twice; the output is the stream."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(12, 48), nn.Linear(48, 12)
        self.fc3, self.fc4 = nn.Linear(12, 48), nn.Linear(48, 12)

    def forward(self, x):
        h = x + self.fc2(torch.relu(self.fc1(x)))
        return h + self.fc4(torch.relu(self.fc3(h)))


def _batches(count=6):
    """1,536 rows: at least the 32 per kept channel (24 here) a writer needs to take up the drift."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(256, 12, generator=g) for _ in range(count)]


def windows():
    """64 windows of 32 token ids: 2,048 rows, 32 per kept MLP channel (48)."""
    return torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(1))


def _compress(target):
    model = ResidualMLP().eval()
    result = grailc.compress(model, calib=_batches(), ratio=0.5, selector="wanda", compensate="grail",
                             compensate_target=target, calib_held_out=0, measure_latency=False, lam=1e-3)
    return model, result


def _stream_error(model, result):
    """Relative error of the output (the stream after the second block) over the calibration rows."""
    x = torch.cat(_batches())
    with torch.no_grad():
        dense, compressed = model(x), result.module(x)
    return float((dense - compressed).norm() / dense.norm())


def test_the_writers_are_the_linears_added_into_the_stream():
    _, result = _compress("stream")
    assert len(result.report["stream_writers"]) == 2  # fc2 and fc4; fc1 and fc3 add into nothing
    _, plain = _compress("input")
    assert "stream_writers" not in plain.report


def test_a_writer_with_too_few_rows_per_kept_channel_keeps_the_input_target():
    model = ResidualMLP().eval()
    few = [b[:100] for b in _batches()]  # 600 rows < 32 x 24
    result = grailc.compress(model, calib=few, ratio=0.5, selector="wanda", compensate="grail",
                             compensate_target="stream", calib_held_out=0, measure_latency=False)
    assert result.report["stream_writers"] == [] and len(result.report["stream_writers_few_rows"]) == 2
    by_input = grailc.compress(model, calib=few, ratio=0.5, selector="wanda", compensate="grail",
                               compensate_target="input", calib_held_out=0, measure_latency=False)
    for (name, a), (_, b) in zip(result.module.named_parameters(), by_input.module.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_the_stream_target_takes_up_the_drift_of_the_first_block():
    model, by_input = _compress("input")
    _, by_stream = _compress("stream")
    fc2 = [name for name, _ in by_input.module.named_parameters() if "fc2" in name and "weight" in name][0]
    fc4 = fc2.replace("fc2", "fc4")
    params_input, params_stream = dict(by_input.module.named_parameters()), dict(by_stream.module.named_parameters())
    # before fc2 nothing is compressed on the stream (h = x in both runs): the same solve
    torch.testing.assert_close(params_input[fc2], params_stream[fc2])
    # fc4 also rebuilds what the compressed first block lost from the stream
    assert not torch.allclose(params_input[fc4], params_stream[fc4])
    # least squares of the output itself over the same rows and the same kept channels: never worse
    assert _stream_error(model, by_stream) < 0.98 * _stream_error(model, by_input)


def test_the_stream_target_needs_sequential_calibration():
    with pytest.raises(RecipeError, match="needs sequential calibration"):
        make_recipe(compensate_target="stream", sequential=False).validate()
    with pytest.raises(RecipeError, match="compensate_target"):
        make_recipe(compensate_target="output").validate()


def _final_stream_error(model, dense):
    ids = windows()
    with torch.no_grad():
        a = dense.model(ids).last_hidden_state
        b = model.model(ids).last_hidden_state
    return float((a - b).norm() / a.norm())


def test_decoder_layers_rebuild_the_dense_models_stream():
    """Each layer's MLP is fitted to the dense model's stream (carried beside the compressed one), so the last
    layer's output is closer to the dense model's than when each layer rebuilds the dense layer's own output."""
    dense = tiny_llama()
    errors = {}
    for target in ("input", "stream"):
        model = tiny_llama()
        recipe = make_recipe(ratio=0.5, targets=["mlp"], compensate_target=target, calib_batch_size=4)
        report = compress_layers(model, windows(), recipe)
        assert [layer["after"]["intermediate_size"] for layer in report["layers"]] == [48, 48, 48]
        if target == "stream":  # down_proj in every layer, with 2,048 rows for 48 kept channels
            assert [layer["stream_writers"] for layer in report["layers"]] == [1, 1, 1]
        errors[target] = _final_stream_error(model, dense)
    assert errors["stream"] < errors["input"], errors


def test_auto_is_the_stream_where_it_applies():
    assert make_recipe().resolved().compensate_target == "stream"
    assert make_recipe(sequential=False).resolved().compensate_target == "input"
    assert make_recipe(targets=["mlp", "hidden"]).resolved(llm=True).compensate_target == "input"
    with pytest.raises(RecipeError, match="--targets hidden"):
        make_recipe(ratio=0.5, targets=["hidden"], compensate_target="stream").validate()


def test_decoder_layers_with_too_few_tokens_keep_the_input_target():
    """With under 32 tokens per kept channel the whole run keeps each consumer's input target (and no dense
    stream), and the report says why."""
    few = windows()[:8, :16]  # 128 tokens for 48 kept channels
    weights = {}
    for target in ("input", "stream"):
        model = tiny_llama()
        recipe = make_recipe(ratio=0.5, targets=["mlp"], compensate_target=target, calib_batch_size=4)
        report = compress_layers(model, few, recipe)
        weights[target] = model.state_dict()
    record = report["compensate_target"]
    assert record["used"] == "input" and "128 calibration tokens" in record["why"]
    for name, value in weights["input"].items():
        torch.testing.assert_close(weights["stream"][name], value, msg=name)
