"""The speed measurement (grailc/bench.py): interleaving, statistics, inputs, and a dense/compressed comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark

from grailc.bench import (
    Settings,
    block_hint,
    bound_call,
    compare,
    conv_widths,
    interleaved_ms,
    nodes_elsewhere,
    placement,
    provider_problem,
    quartiles,
    random_feed,
    session,
    table,
)
from grailc.errors import GrailcError
from grailc.export import save_onnx
from grailc.trace import capture, export


def test_calls_are_interleaved_in_alternating_order():
    order = []
    times = interleaved_ms([lambda: order.append("d"), lambda: order.append("c")], repeats=4, warmup=1)
    assert order == ["d", "c"] + ["d", "c", "c", "d", "d", "c", "c", "d"]
    assert [len(t) for t in times] == [4, 4] and all(v >= 0 for t in times for v in t)


def test_a_time_budget_stops_after_the_minimum_repeats():
    times = interleaved_ms([lambda: sum(range(1000))], repeats=1000, warmup=0, max_seconds=0.0, min_repeats=3)
    assert len(times[0]) == 3


def test_quartiles():
    assert quartiles([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "q1": 2.0, "q3": 4.0}
    assert quartiles([7.0]) == {"median": 7.0, "q1": 7.0, "q3": 7.0}


class TwoInputs(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.embed = torch.nn.Embedding(10, width)
        self.proj = torch.nn.Linear(width, 4)

    def forward(self, ids, mask):
        return self.proj(self.embed(ids) * mask.unsqueeze(-1))


def onnx_file(model, shapes, path, data=None):
    gm, example = capture(model.eval(), shapes, data=data)
    save_onnx(export(gm, example), example, path)
    return path


def test_feed_has_the_batch_and_the_report_shapes(tmp_path):
    ids, mask = torch.ones(2, 6, dtype=torch.int64), torch.ones(2, 6)
    path = onnx_file(TwoInputs(8), [(1, 6), (1, 6)], tmp_path / "m.onnx", data=(ids, mask))
    feed = random_feed(session(path, "CPUExecutionProvider"), 3, [[1, 6], [1, 6]])
    assert [v.shape for v in feed.values()] == [(3, 6), (3, 6)]
    ids_feed = next(v for v in feed.values() if v.dtype.kind == "i")
    assert (ids_feed == 1).all()  # a valid token id whatever the vocabulary


def test_sessions_do_not_spin_and_bound_calls_give_the_model_outputs(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    sess = session(onnx_file(model, [(1, 3, 8, 8)], tmp_path / "m.onnx"), "CPUExecutionProvider", threads=2)
    options = sess.get_session_options()
    for pool in ("intra_op", "inter_op"):  # two sessions in one process must not take the cores from each other
        assert options.get_session_config_entry(f"session.{pool}.allow_spinning") == "0"
    feed = random_feed(sess, 2)
    (out,) = bound_call(sess, feed, "CPUExecutionProvider")().copy_outputs_to_cpu()
    expected = model(torch.from_numpy(next(iter(feed.values())))).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_compare_measures_both_models_at_every_batch(tmp_path):
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 3))
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    d = onnx_file(dense, [(1, 3, 16, 16)], tmp_path / "dense.onnx")
    c = onnx_file(small, [(1, 3, 16, 16)], tmp_path / "model.onnx")
    bench = compare(d, c, Settings(batches=(1, 4), repeats=3, warmup=1, threads=1), ideal=4.0)
    assert [(r["batch"], r["precision"], r["provider"]) for r in bench["runs"]] == [
        (1, "fp32", "CPUExecutionProvider"), (4, "fp32", "CPUExecutionProvider")]
    for r in bench["runs"]:
        figures = [r["dense_ms"]["median"], r["compressed_ms"]["median"], r["speedup"], *r["speedup_iqr"],
                   r["dense_samples_per_s"], r["realised_fraction_of_ideal"]]
        assert all(math.isfinite(v) and v > 0 for v in figures) and r["repeats"] == 3
        assert r["dense_ms"]["q1"] <= r["dense_ms"]["median"] <= r["dense_ms"]["q3"]
    assert bench["conv_widths"] == {"dense": {"convs": 2, "not_multiple_of_16": 1},
                                    "compressed": {"convs": 2, "not_multiple_of_16": 2}}
    text = table(bench)
    assert "4.00x" in text and len(text.splitlines()) == 5  # header, columns, two runs, the hint on widths


def test_convolutions_off_the_cpu_block_are_counted_and_named_in_the_table(tmp_path):
    """A width that is not a multiple of 16 runs outside ONNX Runtime's blocked layout: the table says so."""
    dense = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 16, 1))
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 22, 3), torch.nn.ReLU(), torch.nn.Conv2d(22, 16, 1))
    d = onnx_file(dense, [(1, 3, 16, 16)], tmp_path / "dense.onnx")
    c = onnx_file(small, [(1, 3, 16, 16)], tmp_path / "model.onnx")
    assert conv_widths(d) == {"convs": 2, "not_multiple_of_16": 0}
    assert conv_widths(c) == {"convs": 2, "not_multiple_of_16": 1}
    bench = compare(d, c, Settings(batches=(1,), repeats=3, warmup=1, threads=1), ideal=1.4)
    assert table(bench).splitlines()[-1] == (
        "1 of 2 convolutions have output channels that are not a multiple of 16 (dense: 0): ONNX Runtime's CPU runs "
        "them outside its blocked layout; compress with --multiple-of 16 to round every kept width")
    same = {"conv_widths": {"dense": conv_widths(c), "compressed": conv_widths(c)}, "runs": bench["runs"]}
    assert block_hint(same) is None  # no more off the block than the dense model: nothing to say


def test_an_unknown_or_missing_provider_is_refused(tmp_path):
    with pytest.raises(GrailcError, match="unknown provider"):
        compare(tmp_path / "a.onnx", tmp_path / "b.onnx", Settings(provider="metal"))


def test_the_provider_probe_runs_whatever_ir_version_the_onnx_package_stamps():
    """The probe's one-node model carries an IR version every ONNX Runtime reads: an onnx package newer than the
    runtime (IR 14 against a runtime reading up to 13) must not make every provider look unusable. On a machine
    without a GPU the CUDA provider is named with what happened instead."""
    import onnxruntime as ort

    from grailc.bench import CPU, CUDA

    assert provider_problem(CPU) is None
    if CUDA in ort.get_available_providers() and not torch.cuda.is_available():
        assert provider_problem(CUDA) == "a session on it falls back to CPU"


def test_a_graph_travels_without_its_weights_and_runs_refilled(tmp_path):
    """benchmarks/speed_remote.py: strip the float initialisers, refill them with random values of their shapes."""
    remote = load_benchmark("speed_remote")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.ReLU(), torch.nn.Conv2d(64, 8, 1))
    path = onnx_file(model, [(1, 3, 16, 16)], tmp_path / "m.onnx")
    remote.strip(path, tmp_path / "s.onnx")
    assert (tmp_path / "s.onnx").stat().st_size < path.stat().st_size / 4
    filled = remote.refill(tmp_path / "s.onnx", tmp_path / "f.onnx")
    original, refilled = (session(p, "CPUExecutionProvider") for p in (path, filled))
    feed = random_feed(original, 2)
    a, b = original.run(None, feed)[0], refilled.run(None, feed)[0]
    assert a.shape == b.shape and not np.allclose(a, b) and np.isfinite(b).all() and b.std() > 0


def test_a_profile_shows_which_nodes_ran_off_the_provider(tmp_path):
    """The placement check reads ONNX Runtime's own profile: on the CPU provider every node ran on the CPU, so
    asked about the CUDA provider, every node (and no device copy) is reported."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    path = onnx_file(model, [(1, 3, 16, 16)], tmp_path / "m.onnx")
    feed = random_feed(session(path, "CPUExecutionProvider"), 1)
    assert placement(path, "CPUExecutionProvider", feed, tmp_path) == []
    off = placement(path, "CUDAExecutionProvider", feed, tmp_path)
    assert {"Conv", "MaxPool"} <= {x.split()[0] for x in off}  # with the CPU's layout reorders; ReLU fused
    assert not list(tmp_path.glob("profile*"))  # the profile files are removed
    def node(name, op, provider):
        return {"cat": "Node", "name": f"{name}_kernel_time", "args": {"op_name": op, "provider": provider}}

    shape = {**node("s", "Squeeze", "CPUExecutionProvider"), "args": {
        "op_name": "Squeeze", "provider": "CPUExecutionProvider", "output_type_shape": [{"int64": []}]}}
    events = [node("n1", "MaxPool", "CPUExecutionProvider"), node("c", "MemcpyToHost", "CPUExecutionProvider"),
              node("n2", "Conv", "CUDAExecutionProvider"), {"cat": "Session", "name": "model_run", "args": {}}, shape]
    assert nodes_elsewhere(events, "CUDAExecutionProvider") == ["MaxPool (n1)"]  # shape arithmetic is left out
