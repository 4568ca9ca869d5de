"""Speed on another machine: graphs prepared here, measured where only ONNX Runtime is needed (e.g. a GPU box).

    .venv/bin/python benchmarks/speed_remote.py prepare DIR [--models resnet50 ...] [--ratios 0.3 0.5]
        [--multiple-of 1 auto 8] [--no-torch-pruning]
    python benchmarks/speed_remote.py measure DIR [--provider auto] [--batch 1 64] [--repeats 30]

``prepare`` compresses every model as ``benchmarks/speed.py`` does (grailc at each ``--multiple-of``, Torch-Pruning's
magnitude pruner at the same ratio, SmolLM2 layer by layer) and writes the dense and the pruned ONNX graphs with
their float initialisers of 64 or more elements emptied: speed does not depend on the weight values, and a graph
without its weights is kilobytes, so the folder travels where the weights would not. ``manifest.json`` lists the
pairs with their MACs (grailc's counter) and sample shapes. ``measure`` fills every emptied initialiser with Gaussian
values of its stored shape and type and measures each pair with :func:`grailc.bench.compare` (the
``grailc bench`` code: interleaved runs, medians, fp32 and fp16 on a GPU, inputs and outputs kept on the GPU). The
table and ``results.jsonl`` (one line per measured configuration, written as it goes) go to DIR or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

EMPTIED = "grailc:random"  # doc_string of an initialiser whose values were dropped; its dims and type are kept
FLOATS = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def strip(path: Path, out: Path) -> None:
    """``path`` without the values of its float initialisers of 64 or more elements (see the module docstring)."""
    import onnx

    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.data_type in FLOATS and int(np.prod(init.dims)) >= 64:
            for field in ("raw_data", "float_data", "double_data", "int32_data"):
                init.ClearField(field)
            init.doc_string = EMPTIED
    for node in model.graph.node:  # the exporter's per-node metadata (source locations) would be most of the rest
        node.ClearField("metadata_props")
        node.doc_string = ""
    onnx.save(model, str(out))


def refill(path: Path, out: Path, seed: int = 0) -> Path:
    """``path`` with Gaussian values in every initialiser :func:`strip` emptied: standard deviation
    1 / sqrt(fan-in) for matrices and kernels (activations neither vanish into subnormals nor blow up), 0.05 for
    vectors."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.doc_string == EMPTIED:
            dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
            dims = tuple(init.dims)
            scale = 1 / np.sqrt(np.prod(dims[1:])) if len(dims) > 1 else 0.05  # variance kept layer to layer
            values = (scale * rng.standard_normal(dims)).astype(dtype)
            init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, str(out))
    return out


def prepare(args) -> None:
    """Compress and export every model and ratio; write the stripped graphs and manifest.json into args.dir."""
    import tempfile

    from speed import LLM_TOKENS, LLMS, MODELS, dense_onnx, methods, pruned_onnx, random_calib

    from grailc.recipe import parse_multiple

    unknown = set(args.models or ()) - {*MODELS, *LLMS}
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}: choose from {[*MODELS, *LLMS]}")

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    shape = (1, 3, args.side, args.side)
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models or [*MODELS, *LLMS]:
            llm = name in LLMS
            model, dense = dense_onnx(name, shape, Path(tmp) / "dense.onnx")
            strip(dense[0], folder / f"{name}.onnx")
            calib = random_calib(shape)
            for ratio in args.ratios:
                multiples = [parse_multiple(m) for m in args.multiple_of]
                for method, multiple in methods(multiples, not (args.no_torch_pruning or llm)):
                    start = time.perf_counter()
                    file = f"{name}_{ratio:g}_{method.replace(' ', '')}.onnx"
                    try:
                        pruned = pruned_onnx(model, llm, ratio, multiple, shape, calib, Path(tmp) / "pruned.onnx")
                    except Exception as e:  # a pruner that cannot handle the model: say so, go on
                        print(f"{name} {ratio:g} {method}: failed: {type(e).__name__}: {str(e)[:100]}", flush=True)
                        continue
                    strip(pruned[0], folder / file)
                    pairs.append({"model": name, "ratio": ratio, "method": method, "dense": f"{name}.onnx",
                                  "pruned": file, "macs_dense": dense[1], "macs_pruned": pruned[1],
                                  "shapes": [[1, LLM_TOKENS]] if llm else None})
                    print(f"{name} {ratio:g} {method}: MACs {pruned[1] / dense[1]:.3f} "
                          f"({time.perf_counter() - start:.0f} s)", flush=True)
    (folder / "manifest.json").write_text(json.dumps(pairs, indent=1))
    print(f"wrote {len(pairs)} pairs to {folder}")


def measure(args) -> None:
    """Refill and measure every pair of the manifest; print the table and append to results.jsonl."""
    import tempfile

    from grailc.bench import Settings, compare

    folder = Path(args.dir)
    out = Path(args.out or folder)
    out.mkdir(parents=True, exist_ok=True)
    pairs = json.loads((folder / "manifest.json").read_text())
    if args.models:
        pairs = [p for p in pairs if p["model"] in args.models]
    pairs.sort(key=lambda p: -p["ratio"])  # the largest ratio first: a run cut short has every model at it
    print(f"{'model':18} {'ratio':>5} {'method':16} {'provider':8} {'prec':4} {'batch':>5} {'MACs':>6} "
          f"{'speed-up':>8} {'ideal':>6} {'realised':>8} {'dense ms':>9} {'pruned ms':>9}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, open(out / "results.jsonl", "a") as log:
        filled: dict[str, Path] = {}
        for p in pairs:
            for key in ("dense", "pruned"):
                if p[key] not in filled:
                    filled[p[key]] = refill(folder / p[key], Path(tmp) / p[key])
            ideal = p["macs_dense"] / p["macs_pruned"]
            settings = Settings(batches=tuple(args.llm_batch if p["shapes"] else args.batch), repeats=args.repeats,
                                warmup=5, max_seconds=args.max_seconds, threads=args.threads, provider=args.provider)
            bench = compare(filled[p["dense"]], filled[p["pruned"]], settings, p["shapes"], ideal=ideal, log=print)
            for r in bench["runs"]:
                log.write(json.dumps({**p, **r, "onnxruntime": bench["onnxruntime"]}) + "\n")
                log.flush()
                print(f"{p['model']:18} {p['ratio']:>5.2f} {p['method']:16} "
                      f"{r['provider'].replace('ExecutionProvider', ''):8} {r['precision']:4} {r['batch']:>5} "
                      f"{1 / ideal:>6.3f} {r['speedup']:>7.2f}x {ideal:>5.2f}x {r['realised_fraction_of_ideal']:>8.2f} "
                      f"{r['dense_ms']['median']:>9.3f} {r['compressed_ms']['median']:>9.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="compress and export here; write stripped graphs and manifest.json")
    prep.add_argument("dir")
    prep.add_argument("--models", nargs="+", help="default: every model of benchmarks/speed.py")
    prep.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    prep.add_argument("--multiple-of", nargs="+", default=["1", "8"], help="1, auto or a whole number each")
    prep.add_argument("--side", type=int, default=224)
    prep.add_argument("--no-torch-pruning", action="store_true")
    meas = sub.add_parser("measure", help="refill and measure the pairs of DIR/manifest.json")
    meas.add_argument("dir")
    meas.add_argument("--out", help="folder for results.jsonl (default DIR)")
    meas.add_argument("--models", nargs="+", help="only these models of the manifest")
    meas.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"])
    meas.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batches of the image models")
    meas.add_argument("--llm-batch", type=int, nargs="+", default=[1, 8], help="sequences of 128 tokens")
    meas.add_argument("--repeats", type=int, default=30)
    meas.add_argument("--max-seconds", type=float, default=5.0, help="per measured configuration")
    meas.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    prepare(args) if args.command == "prepare" else measure(args)


if __name__ == "__main__":
    main()
