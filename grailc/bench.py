"""Inference speed: the dense and the compressed ONNX models measured side by side in one process.

What is measured: the wall time (``time.perf_counter``) of one ``InferenceSession.run`` on a fixed random input,
for the dense and the compressed model (on a GPU with the input already on the GPU and the output left there),
each with its own ONNX Runtime session (all graph optimisations on), on the same execution provider, with the same
thread count. After ``warmup`` calls of each, the calls are interleaved in pairs whose order alternates (dense,
compressed, compressed, dense, ...) so that a machine that slows down or speeds up during the run affects both
alike. Each model gets the median and the interquartile range of its times; the speed-up is the median of the
per-pair ratios dense / compressed (with its IQR), which also cancels slow drift. The sessions' worker threads
do not spin-wait after a run: two sessions live in one process, and each one's spinning workers took the cores
from the other (ResNet-50 on this 2-core machine, batch 1: 40 ms a run without spinning, 56 to 77 ms with it,
depending on which session was created last).
The ideal speed-up is MACs before / MACs after; ``realised`` is the measured speed-up over the ideal one.

Execution providers: the CPU EP here; on a GPU the CUDA EP, and the TensorRT EP where its libraries load, each in
fp32 and fp16 (the graph converted to float16 inside, float32 inputs and outputs kept). On a GPU provider each
model is first run once with ONNX Runtime's profiler, and the nodes that ran on another provider (no kernel there,
so ONNX Runtime put them on the CPU between two device copies) are reported (``nodes_elsewhere``) and logged.

Convolution widths (``conv_widths``): ONNX Runtime's CPU EP runs a convolution in its blocked layout (NCHWc, blocks
of 16 channels on AVX-512, 8 on AVX2) only when its output channels are a whole number of blocks; any other runs
unblocked, with reorders around it, and can be slower than the dense one it replaced. Both models' counts are
reported, and the table says so when compression left convolutions off the block of 16 (``--multiple-of 16``).
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grailc.errors import GrailcError
from grailc.metrics import CPU_BLOCK

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
PROVIDER_NAMES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}


def interleaved_ms(calls: list[Callable[[], object]], repeats: int, warmup: int = 1,
                   max_seconds: float | None = None, min_repeats: int = 5) -> list[list[float]]:
    """Wall times in ms of each of ``calls``, run ``repeats`` times in rounds; the order within a round is reversed
    every other round. Stops early (after at least ``min_repeats`` rounds) once ``max_seconds`` have passed."""
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    start = time.perf_counter()
    for r in range(repeats):
        order = range(len(calls)) if r % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            t0 = time.perf_counter()
            calls[i]()
            times[i].append(1000 * (time.perf_counter() - t0))
        if max_seconds is not None and r + 1 >= min_repeats and time.perf_counter() - start > max_seconds:
            break
    return times


def quartiles(values: list[float]) -> dict:
    """Median and interquartile range of ``values``."""
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


GPU_NEEDS = {CUDA: "an NVIDIA GPU with CUDA 13 and cuDNN 9", TENSORRT: "an NVIDIA GPU with TensorRT 10's libraries"}


def providers(choice: str = "auto") -> list[str]:
    """The execution providers to measure on: ``auto`` picks CUDA, and TensorRT where it loads, when a GPU is
    present, else CPU. A provider named explicitly that ONNX Runtime lists but cannot run (onnxruntime-gpu on a
    machine without a GPU, or without the provider's libraries) is refused here, before anything is measured."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if choice != "auto":
        if choice not in PROVIDER_NAMES:
            raise GrailcError(f"unknown provider {choice!r}", fix="use auto, cpu, cuda or tensorrt")
        name = PROVIDER_NAMES[choice]
        if name not in available:
            raise GrailcError(f"ONNX Runtime here has no {name} (it has {', '.join(available)})",
                              fix="use --provider cpu (or auto), or install an onnxruntime build with that provider")
        problem = provider_problem(name) if name != CPU else None
        if problem:
            raise GrailcError(f"--provider {choice}: ONNX Runtime lists {name} but cannot run a model on it here "
                              f"({problem}); it needs {GPU_NEEDS[name]}",
                              fix="run on such a machine, or use --provider cpu (auto picks what runs here)")
        return [name]
    if _has_gpu() and CUDA in available and runs_on(CUDA):
        return [CUDA, TENSORRT] if TENSORRT in available and runs_on(TENSORRT) else [CUDA]
    return [CPU]


def runs_on(provider: str) -> bool:
    """Whether ONNX Runtime really runs a session on ``provider`` (see :func:`provider_problem`)."""
    return provider_problem(provider) is None


@functools.cache
def provider_problem(provider: str) -> str | None:
    """None where ONNX Runtime really runs a session on ``provider``, else what happened instead: a one-node model
    (IR version 8, which every ONNX Runtime reads, whatever the onnx package would stamp) is loaded on it (with the
    CPU behind it), quietly, and the session asked which provider it got (once per process)."""
    import contextlib
    import io

    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)  # the provider libraries' load errors, which the answer replaces
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints its fallback
            sess = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=[provider, CPU])
        used = sess.get_providers()[0]
        return None if used == provider else f"a session on it falls back to {used.removesuffix('ExecutionProvider')}"
    except Exception as e:
        return f"a session on it fails: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    finally:
        ort.set_default_logger_severity(2)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def session(path: Path, provider: str, threads: int | None = None, profile_prefix: str | None = None):
    """An ONNX Runtime session on ``provider`` (CPU as fallback for unsupported nodes) with all graph optimisations;
    ``profile_prefix``: ONNX Runtime's profiler on, writing there."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see the module docstring
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    chain = [provider] if provider == CPU else [provider, CPU]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=chain)
    except Exception as e:
        raise GrailcError(f"ONNX Runtime cannot load the model on {provider}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}", where=str(path),
                          fix="check the file (re-run grailc compress), or choose another --provider") from e


_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def batch_axis_fixed(sess) -> int | None:
    """The batch size the model is fixed to, or None when its batch axis is dynamic."""
    first = sess.get_inputs()[0].shape
    return first[0] if first and isinstance(first[0], int) else None


def random_feed(sess, batch: int, shapes: list[list[int]] | None = None, seed: int = 0) -> dict:
    """One input per model input: Gaussian floats, ones for integer inputs (token id 1, attention mask 1). Dynamic
    axes other than the batch take their size from ``shapes`` (one sample shape per input, batch first)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for k, inp in enumerate(sess.get_inputs()):
        dims = []
        for axis, d in enumerate(inp.shape):
            if axis == 0:
                dims.append(batch)
            elif isinstance(d, int):
                dims.append(d)
            elif shapes and k < len(shapes) and axis < len(shapes[k]):
                dims.append(int(shapes[k][axis]))
            else:
                raise GrailcError(f"input {inp.name} has a dynamic axis {axis} ({d}) of unknown size",
                                  fix="the report's recipe.input_shape should give it; re-run grailc compress")
        dtype = _NUMPY.get(inp.type)
        if dtype is None:
            raise GrailcError(f"input {inp.name} has type {inp.type}, which the benchmark cannot feed")
        feed[inp.name] = (rng.standard_normal(dims).astype(dtype) if np.issubdtype(dtype, np.floating)
                          else np.ones(dims, dtype))
    return feed


def to_float16(path: Path, out: Path) -> Path:
    """A float16 copy of the ONNX model at ``path`` (float32 inputs and outputs kept), for GPU providers."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    onnx.save(model, str(out))
    return out


@dataclass
class Settings:
    batches: tuple[int, ...] = (1, 32)
    repeats: int = 50
    warmup: int = 5
    max_seconds: float = 30.0  # per configuration: fewer repeats (at least 5) on slow models
    threads: int | None = None  # ONNX Runtime's default: one per physical core
    provider: str = "auto"


def compare(dense: Path, compressed: Path, settings: Settings, shapes: list[list[int]] | None = None,
            ideal: float | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Measure ``dense`` against ``compressed`` at every batch size, provider and precision of ``settings``;
    ``log`` hears about providers that ONNX Runtime could not use."""
    runs = []
    chosen = providers(settings.provider)
    with tempfile.TemporaryDirectory(prefix="grailc-bench-") as tmp:
        for provider in chosen:
            for precision in ("fp32", "fp16") if provider != CPU else ("fp32",):
                paths = (dense, compressed) if precision == "fp32" else (
                    to_float16(dense, Path(tmp) / "dense16.onnx"), to_float16(compressed, Path(tmp) / "comp16.onnx"))
                try:
                    sessions = [session(p, provider, settings.threads) for p in paths]
                except GrailcError as e:
                    if provider != TENSORRT or settings.provider != "auto":
                        raise
                    if log:  # listed by onnxruntime-gpu, but TensorRT's own libraries may be missing
                        log(f"{provider} skipped: {e.what}")
                    continue
                used = sessions[0].get_providers()[0]
                if used != provider:  # e.g. TensorRT listed but its libraries missing: ORT fell back
                    if log:
                        log(f"{provider} is not usable here (ONNX Runtime fell back to {used}); skipped")
                    continue
                fixed = batch_axis_fixed(sessions[0])
                elsewhere = {}  # on a GPU provider: the nodes it has no kernel for
                if provider != CPU:
                    feed = random_feed(sessions[0], fixed or 1, shapes)
                    elsewhere = {name: placement(p, provider, feed, Path(tmp))
                                 for name, p in zip(("dense", "compressed"), paths)}
                if log and any(elsewhere.values()):
                    log(f"{provider} {precision}: nodes that ran on another provider (ONNX Runtime has no kernel "
                        f"for them there; each costs two device copies): {elsewhere}")
                for batch in dict.fromkeys([fixed] if fixed else settings.batches):
                    run = _measure(sessions, batch, shapes, settings, provider, precision, ideal, fixed)
                    runs.append({**run, "nodes_elsewhere": elsewhere} if elsewhere else run)
    if not runs:
        raise GrailcError(f"nothing was measured: ONNX Runtime ran neither model on {', '.join(chosen)}",
                          fix="use --provider cpu")
    return {
        "onnxruntime": _ort_version(),
        "threads": settings.threads or "default (one per physical core)",
        "cpu_count": os.cpu_count(),
        "warmup": settings.warmup,
        "ideal_speedup": ideal,
        "conv_widths": {"dense": conv_widths(dense), "compressed": conv_widths(compressed)},
        "runs": runs,
    }


def conv_widths(path: Path) -> dict:
    """The convolutions of an ONNX file (top-level graph, weights given as initializers) and how many of them have
    output channels that are not a multiple of ``CPU_BLOCK``. Reads the graph only, not external weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {t.name: t.dims for t in model.graph.initializer}
    outs = [dims[n.input[1]][0] for n in model.graph.node
            if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in dims]
    return {"convs": len(outs), f"not_multiple_of_{CPU_BLOCK}": sum(o % CPU_BLOCK != 0 for o in outs)}


def nodes_elsewhere(events: list[dict], provider: str) -> list[str]:
    """The nodes that an ONNX Runtime profile (the events of its JSON file) shows running on a provider other than
    ``provider``, as ``op (node)``; the device copies around them are left out, and so is shape arithmetic (nodes
    whose outputs are all integers, e.g. the batch size read for a reshape), which ONNX Runtime places on the CPU
    on purpose."""
    found: dict[str, str] = {}
    for e in events:
        args = e.get("args", {})
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith("_kernel_time") and args.get("provider", provider) != provider:
            outputs = [kind for out in args.get("output_type_shape", []) for kind in out]
            if outputs and all(kind in ("int64", "int32") for kind in outputs):
                continue
            if args.get("op_name") not in ("MemcpyToHost", "MemcpyFromHost"):
                found[name.removesuffix("_kernel_time")] = args.get("op_name", "?")
    return [f"{op} ({node})" for node, op in found.items()]


def placement(path: Path, provider: str, feed: dict, folder: Path) -> list[str]:
    """Run ``path`` once on ``provider`` with ONNX Runtime's profiler on: the nodes that ran elsewhere
    (:func:`nodes_elsewhere`; ONNX Runtime falls back to the CPU for a node its provider has no kernel for)."""
    import json

    sess = session(path, provider, profile_prefix=str(folder / "profile"))
    sess.run(None, feed)
    profile = Path(sess.end_profiling())
    try:
        return nodes_elsewhere(json.loads(profile.read_text()), provider)
    finally:
        profile.unlink(missing_ok=True)


def bound_call(sess, feed: dict, provider: str) -> Callable[[], object]:
    """One inference of ``sess`` on ``feed`` through ONNX Runtime's I/O binding: the inputs are placed on the
    provider's device once and the outputs stay there, so on a GPU a call times the model, not host <-> device
    copies. The call returns when the device is done (ONNX Runtime synchronises at the end of a run)."""
    import onnxruntime as ort

    device = "cpu" if provider == CPU else "cuda"
    binding = sess.io_binding()
    for name, array in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
    for out in sess.get_outputs():
        binding.bind_output(out.name, device, 0)

    def call():
        sess.run_with_iobinding(binding)
        return binding  # binding.copy_outputs_to_cpu() gives the outputs

    return call


def _measure(sessions, batch, shapes, settings, provider, precision, ideal, fixed) -> dict:
    feed = random_feed(sessions[0], batch, shapes)
    calls = [bound_call(s, feed, provider) for s in sessions]
    dense_ms, comp_ms = interleaved_ms(calls, settings.repeats, settings.warmup, settings.max_seconds)
    ratios = [d / c for d, c in zip(dense_ms, comp_ms)]
    speedup = quartiles(ratios)
    d, c = quartiles(dense_ms), quartiles(comp_ms)
    for name, values in (("dense", d), ("compressed", c)):
        if not all(np.isfinite(v) and v > 0 for v in values.values()):
            raise GrailcError(f"the {name} model's timings are not positive and finite ({values})",
                              fix="re-run; report it if it persists")
    return {
        "provider": provider,
        "precision": precision,
        "batch": batch,
        "batch_fixed_by_model": fixed is not None,
        "repeats": len(dense_ms),
        "dense_ms": d,
        "compressed_ms": c,
        "speedup": speedup["median"],
        "speedup_iqr": [speedup["q1"], speedup["q3"]],
        "dense_samples_per_s": 1000 * batch / d["median"],
        "compressed_samples_per_s": 1000 * batch / c["median"],
        "realised_fraction_of_ideal": speedup["median"] / ideal if ideal else None,
    }


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


HEADER = (f"{'provider':10} {'prec':4} {'batch':>5} {'dense ms (IQR)':>22} {'compressed ms (IQR)':>22} "
          f"{'speed-up':>9} {'ideal':>6} {'of ideal':>8}")


def row(run: dict) -> str:
    """One line of the table for one measured configuration."""
    def ms(q):
        return f"{q['median']:.2f} ({q['q1']:.2f}-{q['q3']:.2f})"

    frac = run["realised_fraction_of_ideal"]
    ideal = run["speedup"] / frac if frac else None
    return (f"{run['provider'].replace('ExecutionProvider', ''):10} {run['precision']:4} {run['batch']:>5} "
            f"{ms(run['dense_ms']):>22} {ms(run['compressed_ms']):>22} {run['speedup']:>8.2f}x "
            + (f"{ideal:>5.2f}x {frac:>8.2f}" if frac else f"{'n/a':>6} {'n/a':>8}"))


def table(bench: dict) -> str:
    """The measured speed-ups next to the ideal one, as printed by ``grailc bench``."""
    lines = [f"ONNX Runtime {bench['onnxruntime']}, threads: {bench['threads']}, {bench['cpu_count']} CPUs; "
             f"ideal speed-up (MACs before / after): "
             + (f"{bench['ideal_speedup']:.2f}x" if bench["ideal_speedup"] else "unknown (no MACs in the report)"),
             HEADER]
    lines += [row(r) for r in bench["runs"]]
    hint = block_hint(bench)
    return "\n".join(lines + ([hint] if hint else []))


def block_hint(bench: dict) -> str | None:
    """A line for a compressed model with more convolutions off the CPU block than the dense one (on the CPU EP)."""
    widths, key = bench.get("conv_widths"), f"not_multiple_of_{CPU_BLOCK}"
    if not widths or not any(r["provider"] == CPU for r in bench["runs"]):
        return None
    off, dense_off = widths["compressed"][key], widths["dense"][key]
    if off <= dense_off:
        return None
    return (f"{off} of {widths['compressed']['convs']} convolutions have output channels that are not a multiple "
            f"of {CPU_BLOCK} (dense: {dense_off}): ONNX Runtime's CPU runs them outside its blocked layout; "
            f"compress with --multiple-of {CPU_BLOCK} to round every kept width")


__all__ = ["Settings", "block_hint", "compare", "conv_widths", "interleaved_ms", "nodes_elsewhere", "placement",
           "quartiles", "providers", "random_feed", "table"]
