"""Command line: ``grailc compress MODEL ...`` and ``grailc demo``.

A thin shell over :func:`grailc.compress`: flags override the fields of ``--recipe``. Errors are one line and a
non-zero exit (``--debug`` adds the traceback); outputs appear all at once or not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
import time
from pathlib import Path

import torch

from grailc.errors import GrailcError, OutputExistsError, RecipeError, VerificationError

EPILOG = """exit codes: 0 ok, 2 bad input, 3 verification failed (report written, no model), 4 internal error,
130 interrupted (nothing written)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grailc", description=__doc__.splitlines()[0], epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model", epilog=EPILOG)
    c.add_argument("model", help="a .pt2 file, a torch.save'd module (needs --trust-pickle), "
                   "torchvision:NAME, timm:NAME, or hf:FOLDER (a Hugging Face decoder LM, compressed layer by layer)")
    c.add_argument("--weights", help="state dict (.safetensors/.pth) for torchvision:NAME / timm:NAME")
    c.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a full module (this runs code from the file: only for files you trust)")
    c.add_argument("--input-shape", action="append",
                   help="e.g. 1,3,224,224; repeated, one per input in order, for a model with several (read from a "
                   ".pt2 or a tensor file when omitted)")
    c.add_argument("--calib", help="a folder of images, a .npy/.pt tensor file, or 'random' (data-free); for hf: "
                   "models text:FILE.txt, text:FOLDER (its .txt files) or text:'PATTERN' (a glob)")
    c.add_argument("--calib-batches", type=int, help="number of calibration batches (default 8)")
    c.add_argument("--batch-size", type=int, help="calibration batch size (default 16)")
    c.add_argument("--held-out", type=int, help="batches kept aside to measure the output error (default 2)")
    c.add_argument("--no-normalize", action="store_true", help="do not apply ImageNet normalisation to images")
    c.add_argument("--mean", type=float, nargs="+", help="per-channel mean for images")
    c.add_argument("--std", type=float, nargs="+", help="per-channel std for images")
    c.add_argument("--ratio", type=float, help="fraction of channels removed in every prunable group (default 0.5)")
    c.add_argument("--budget", help="instead of --ratio: params=F or macs=F removes that fraction of the model's "
                   "parameters or MACs, spread across groups by score (each keeps at least --budget-floor)")
    c.add_argument("--budget-floor", type=float, help="under --budget, the fraction of units every group keeps at "
                   "least (default 0.1)")
    c.add_argument("--selector",
                   help="magnitude | wanda | random | gram | fold | wanda_sp | flap | slimgpt | wanda_pp (Wanda++: "
                   "regional gradients, backprop) | auto (default: gram sequential, wanda --one-shot, wanda_sp "
                   "for hf: LLMs)")
    c.add_argument("--compensate", help="grail (alias grail_fold) | none | bias | grail+bias | auto (default: "
                   "grail+bias sequential, grail --one-shot and for hf: LLMs)")
    c.add_argument("--lam", type=float, help="ridge, relative to mean(diag G[K,K]) (default 1e-3; 0.1 for hf: LLMs)")
    c.add_argument("--compensate-target", choices=("auto", "input", "stream"),
                   help="stream: a linear consumer that writes into a residual add rebuilds the dense model's "
                   "stream there, taking up the drift of everything compressed before it (for hf: LLMs the dense "
                   "model's own stream is carried layer to layer; sequential only); input: each consumer rebuilds "
                   "its own dense input; auto (default): stream where it applies (sequential, hidden width not cut)")
    c.add_argument("--kernel-solve", choices=("auto", "channels", "taps"),
                   help="taps: a k x k convolution consumer's new columns are solved over (channel, tap) pairs from "
                   "its input patches, rebuilding a removed channel from the kept ones at every pixel the kernel "
                   "reads (sequential only; a consumer with fewer calibration positions than kept pairs is "
                   "solved over channels); channels: one map for all taps; auto (default): taps when sequential")
    mode = c.add_mutually_exclusive_group()
    mode.add_argument("--sequential", action="store_true",
                      help="calibrate consumer by consumer, in one pass, on the already-compressed upstream, against "
                      "the dense model (the default: the most accurate)")
    mode.add_argument("--one-shot", action="store_true",
                      help="calibrate every group on the dense model in one pass (faster, less accurate)")
    c.add_argument("--repair", action="store_true",
                   help="after pruning, re-estimate BatchNorm statistics on the calibration batches")
    c.add_argument("--reconstruct", metavar="KIND",
                   help="after pruning, train windows of the compressed model with Adam (backprop, no labels) to "
                   "match the dense model's outputs: block (residual blocks), layer (the whole graph; one decoder "
                   "layer for hf:), group (each pruned consumer alone), off (default)")
    c.add_argument("--reconstruct-steps", type=int, help="Adam steps per window (default 300)")
    c.add_argument("--reconstruct-lr", type=float, help="Adam learning rate (default 3e-3; 1e-4 for hf: LLMs)")
    c.add_argument("--reconstruct-batch", type=int,
                   help="minibatch size of the reconstruction (default: the calibration batches as they are)")
    c.add_argument("--reconstruct-params", help="what is trained: all (default), norms+biases, lowrank")
    c.add_argument("--reconstruct-rank", type=int, help="rank of the update with --reconstruct-params lowrank (8)")
    c.add_argument("--reconstruct-fed", help="window inputs: compressed (the reconstructed upstream, default) or "
                   "dense (the dense model's, through the channel map)")
    c.add_argument("--reconstruct-optimizer", help="adam (default) or rmsprop (Wanda++'s regional optimisation; "
                   "--selector wanda_pp on hf: models turns it on with --reconstruct layer)")
    c.add_argument("--targets", help="which groups to prune, comma-separated: channels (alias mlp), heads, vdims "
                   "(the value dims inside every head, instead of whole heads), embed (alias hidden; through "
                   "LayerNorm/RMSNorm, approximate) (default channels,heads)")
    c.add_argument("--multiple-of", type=_multiple, metavar="N|auto",
                   help="round every kept width (channels, heads*head_dim) to a multiple of N (1: exact widths); "
                   "default auto: 8 in groups at least 64 channels wide, where ONNX Runtime's CPU kernels run "
                   "faster on whole blocks of channels")
    c.add_argument("--recipe", help="a TOML recipe; flags override its fields")
    c.add_argument("--max-memory", help="budget for the Gram matrices, e.g. 4GiB (default 8GiB)")
    c.add_argument("--seed", type=int, help="seed for random calibration data and the random selector")
    c.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    c.add_argument("--bench", action="store_true", help="also write dense.onnx and measure it against model.onnx "
                   "with ONNX Runtime (batch 1 and 32; see grailc bench); the speed-ups go into report.json")
    llm = c.add_argument_group("decoder LLMs (hf:FOLDER, --calib text:FILE.txt|FOLDER|PATTERN)")
    llm.add_argument("--calib-samples", type=int,
                     help=f"calibration windows of text (default {LLM_DEFAULTS['calib_samples']})")
    llm.add_argument("--seq-len", type=int,
                     help=f"tokens per calibration window (default {LLM_DEFAULTS['seq_len']})")
    llm.add_argument("--structure", choices=["uniform", "global", "incremental"],
                     help="uniform: --ratio in every layer; global: FLAP's adaptive structure, one parameter budget "
                     "spread across layers by standardised fluctuation scores; incremental: SlimGPT's ratios growing "
                     "with depth, --ratio on average (default uniform)")
    llm.add_argument("--layers", help="compress only these decoder layers, e.g. 0-3,8 (default all)")
    llm.add_argument("--stream", action="store_true", help="read each decoder layer's weights from the "
                     "safetensors files only when its turn comes and write it out as its own shard, instead of "
                     "loading the whole model: CPU memory holds one layer, the embedding and head and the "
                     "calibration activations; the output is the same folder (no ONNX export: give --no-onnx, then run "
                     "grailc export OUT/ where the compressed model fits in memory)")
    llm.add_argument("--device", default="auto", help="auto | cpu | cuda: where the compile computes (auto: CUDA when "
                     "available; under torchrun the GPU of LOCAL_RANK); hf: decoder LLMs go one layer at a time, "
                     "other models are traced on the CPU and come back to it for the export (default auto)")
    c.add_argument("--out", default="grailc-out", help="output folder (default grailc-out)")
    c.add_argument("--force", action="store_true", help="replace an existing output folder")
    c.add_argument("--quiet", action="store_true", help="no progress bars or table")
    c.add_argument("--debug", action="store_true", help="show tracebacks")

    g = sub.add_parser("groups", help="list a model's channel groups and why any is pinned (no calibration)",
                       epilog=EPILOG)
    g.add_argument("model", help="as for compress (hf:FOLDER: one decoder layer's groups)")
    g.add_argument("--weights", help="state dict for torchvision:NAME / timm:NAME")
    g.add_argument("--trust-pickle", action="store_true", help="allow unpickling a full module (runs code)")
    g.add_argument("--input-shape", action="append",
                   help="e.g. 1,3,224,224; repeated for a model with several inputs (read from a .pt2 when omitted)")
    g.add_argument("--targets", help="as for compress: which groups count as prunable")
    g.add_argument("--layer", type=int, help="for hf:FOLDER, the decoder layer whose groups are listed (default 0)")
    g.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("ppl", help="perplexity of a decoder LM over non-overlapping windows of a text file "
                       "(last stdout line: JSON)", epilog=EPILOG)
    p.add_argument("model", help="hf:FOLDER, or an output folder of grailc compress hf:...")
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--windows", type=int, help="use the first N windows (default all)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto: CUDA when available)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    from grailc.bench_command import add_parser as add_bench_parser

    add_bench_parser(sub)

    from grailc.llm.evaluate import add_parser as add_eval_parser

    add_eval_parser(sub, EPILOG)

    from grailc.llm.export_command import add_parser as add_export_parser

    add_export_parser(sub)

    d = sub.add_parser("demo", help="compress the embedded Fashion-MNIST ResNet and measure its test accuracy")
    d.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed (default 0.5)")
    d.add_argument("--selector", default="auto", help="as for compress (default auto)")
    d.add_argument("--out", default="grailc-demo", help="the output folder (default grailc-demo)")
    d.add_argument("--force", action="store_true", help="replace an existing output folder")
    d.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    torch.set_flush_denormal(True)  # subnormal activations only cost time; flushing them changes no figure
    _INTERRUPTS.clear()
    _WRITTEN.clear()
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)}  # both clean up
    joined = False
    try:
        joined = _join_processes(args)
        if args.command == "demo":
            from grailc.demo import run_demo

            return run_demo(args)
        if args.command == "groups":
            return run_groups(args)
        if args.command == "bench":
            from grailc.bench_command import run_bench

            return run_bench(args)
        if args.command == "ppl":
            from grailc.llm.commands import run_ppl

            return run_ppl(args)
        if args.command == "eval":
            from grailc.llm.evaluate import run_eval

            return run_eval(args)
        if args.command == "export":
            from grailc.llm.export_command import run_export

            return run_export(args)
        return run_compress(args, argv)
    except KeyboardInterrupt:
        print(f"grailc: interrupted; {_what_was_written()}", file=sys.stderr)
        return 130
    except GrailcError as e:
        if getattr(args, "debug", False):
            raise
        print(f"grailc: error: {e.line()}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # out of memory, or a bug in grailc: still one line; the traceback with --debug
        if getattr(args, "debug", False):
            raise
        if _is_out_of_memory(e):
            print(f"grailc: error: out of memory ({_first_line(e)}): {_what_was_written()}; lower --input-shape, "
                  "--batch-size or --calib-batches, or free memory", file=sys.stderr)
            return 2
        print(f"grailc: error: internal error (a bug in grailc): {_first_line(e)}: {_what_was_written()}; rerun "
              "with --debug and report the traceback", file=sys.stderr)
        return 4
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if joined:
            from grailc.distributed import shutdown

            shutdown()


def device_for(args) -> torch.device:
    """The device of --device for this command: hf: decoder LLMs (compress, ppl) compute on it one layer at a time;
    other models are traced on the CPU, compiled on it and brought back to the CPU for the export."""
    from grailc.device import resolve_device

    return resolve_device(getattr(args, "device", None) or "auto")


def _join_processes(args) -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group (gloo, or NCCL when computing on a GPU); True when
    this call started it. Only compress shares its work among processes."""
    from grailc import distributed

    if not distributed.launched():
        return False
    if args.command != "compress":
        raise RecipeError(f"grailc {args.command} does not run data-parallel, but WORLD_SIZE > 1 says torchrun "
                          "started it with several processes",
                          fix=f"run grailc {args.command} without torchrun; only grailc compress shares its "
                          "calibration among processes")
    return distributed.init_from_env(device_for(args))


def _multiple(text: str) -> int | str:
    """``--multiple-of``: auto or a whole number."""
    from grailc.recipe import parse_multiple

    try:
        return parse_multiple(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not auto or a whole number (e.g. 8; 1 keeps exact widths)") from None


def _targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# the flags of decoder LLMs (hf:) with their defaults; given for another model they are refused, not ignored
LLM_DEFAULTS = {"calib_samples": 128, "seq_len": 512, "structure": "uniform", "layers": None, "stream": False}


# the flags no hf: decoder LLM reads (it loads a folder and calibrates on text windows): refused there
NOT_LLM = ("input_shape", "weights", "trust_pickle", "calib_batches", "held_out", "no_normalize", "mean", "std")


def _refuse_unread_by_llm(args, advice: str = "") -> None:
    """For a decoder LLM (``args.model`` hf:...), refuse the flags only other models read (``NOT_LLM``)."""
    if not args.model.startswith("hf:"):
        return
    for name in NOT_LLM:
        if getattr(args, name, None) not in (None, False):
            flag = "--" + name.replace("_", "-")
            raise RecipeError(f"{flag} is not read for an hf: decoder LLM, which is loaded from its folder",
                              fix=f"drop {flag}{advice}")


def _llm_flags(args) -> None:
    """Fill in the hf: flags' defaults for a decoder LLM (``args.model`` hf:...); refuse them for any other model,
    and refuse for a decoder LLM the flags only other models read."""
    llm = args.model.startswith("hf:")
    _refuse_unread_by_llm(args, "; --calib-samples, --seq-len and --batch-size size its calibration on text")
    for name, default in LLM_DEFAULTS.items():
        if getattr(args, name, None) in (None, default):
            setattr(args, name, default)
        elif not llm:
            flag = "--" + name.replace("_", "-")
            raise RecipeError(f"{flag} is for hf: decoder LLMs, compressed layer by layer on text windows",
                              fix=f"drop {flag}; for this model, --calib-batches and --batch-size size the "
                                  "calibration and --budget spreads the cuts across groups")


_INTERRUPTS: list[int] = []  # signals received during this run
_WRITTEN: list[Path] = []  # output folders (or files) committed during this run


def note_written(path: Path) -> None:
    """Record an output committed during this run, so that a later failure's message does not say that nothing
    was written."""
    _WRITTEN.append(path)


def _what_was_written() -> str:
    """The truth about the outputs when a run fails: none, or what was committed before the failure."""
    return f"the outputs in {' and '.join(map(str, _WRITTEN))} were written before it" if _WRITTEN \
        else "nothing was written"


def _terminate(signum, frame):
    """Ctrl-C and SIGTERM: stop here. The signal is also remembered, so that an interrupt swallowed by some
    library's cleanup code still stops the compile before anything is written (see ``_stop_if_interrupted``)."""
    _INTERRUPTS.append(signum)
    raise KeyboardInterrupt


def _stop_if_interrupted() -> None:
    if _INTERRUPTS:
        raise KeyboardInterrupt


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, MemoryError) or "can't allocate memory" in text or "out of memory" in text


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:limit] if text else ''}"


def recipe_from_args(args):
    from grailc.api import make_recipe
    from grailc.recipe import load_recipe

    base = load_recipe(args.recipe) if args.recipe else None
    return make_recipe(
        base,
        ratio=args.ratio,
        budget=args.budget,
        budget_floor=args.budget_floor,
        selector=args.selector,
        compensate=args.compensate,
        lam=args.lam,
        compensate_target=args.compensate_target,
        kernel_solve=args.kernel_solve,
        sequential=True if args.sequential else False if args.one_shot else None,
        repair=True if args.repair else None,
        reconstruct=getattr(args, "reconstruct", None),
        reconstruct_steps=getattr(args, "reconstruct_steps", None),
        reconstruct_lr=getattr(args, "reconstruct_lr", None),
        reconstruct_batch=getattr(args, "reconstruct_batch", None),
        reconstruct_params=getattr(args, "reconstruct_params", None),
        reconstruct_rank=getattr(args, "reconstruct_rank", None),
        reconstruct_fed=getattr(args, "reconstruct_fed", None),
        reconstruct_optimizer=getattr(args, "reconstruct_optimizer", None),
        targets=_targets(args.targets) if args.targets else None,
        multiple_of=args.multiple_of,
        max_memory=args.max_memory,
        input_shape=_input_shape_field(args.input_shape),
        calib_source=args.calib,
        calib_batches=args.calib_batches,
        calib_batch_size=args.batch_size,
        calib_held_out=args.held_out,
        calib_normalize=False if args.no_normalize else None,
        calib_mean=args.mean,
        calib_std=args.std,
        calib_seed=args.seed,
        onnx=False if args.no_onnx else None,
    )


def _input_shape_field(texts: list[str] | None):
    """--input-shape as the recipe holds it: one shape, or a list of shapes when the flag is repeated."""
    from grailc.recipe import parse_shape

    if not texts:
        return None
    shapes = [parse_shape(text) for text in texts]
    return shapes[0] if len(shapes) == 1 else shapes


def input_shapes_for(recipe, loaded, names: list[str]) -> list[list[int]]:
    """One shape per model input (``names``): --input-shape, else the shapes a .pt2 was exported with, else a
    tensor file's sample shapes."""
    from grailc.trace import check_input_count

    shape = recipe.input_shape
    if shape:
        shapes = shape if isinstance(shape[0], list) else [shape]
        check_input_count(names, shapes)
        return shapes
    if loaded.exported is not None:
        from grailc.trace import program_inputs

        vals = list(program_inputs(loaded.exported).values())
        if all(v is not None and all(isinstance(d, int) for d in v.shape[1:]) for v in vals):
            return [[1, *(int(d) for d in v.shape[1:])] for v in vals]
    source = Path(recipe.calib.source)
    if source.suffix in (".npy", ".pt", ".pth") and source.is_file():
        from grailc.calib_data import tensor_file_sample_shapes

        return [[1, *s] for s in tensor_file_sample_shapes(source, names)]
    per_input = f", once per input ({', '.join(names)})" if len(names) > 1 else ""
    raise RecipeError("--input-shape is required for this model",
                      fix=f"give it like --input-shape 1,3,224,224{per_input}")


def run_groups(args) -> int:
    """Print the channel groups of a model: what would be pruned together, and what is pinned and why."""
    from types import SimpleNamespace

    from grailc.loading import load_model
    from grailc.passmanager import ANALYSES
    from grailc.recipe import Recipe
    from grailc.trace import capture, input_names

    recipe = Recipe(input_shape=_input_shape_field(args.input_shape),
                    targets=_targets(args.targets) if args.targets else list(Recipe().targets)).validate()
    hf = args.model.startswith("hf:")
    if args.layer is not None and not hf:
        raise RecipeError("--layer is for hf: decoder LLMs only", fix="drop --layer")
    _refuse_unread_by_llm(args)
    if hf:  # compressed layer by layer: one decoder layer's graph, as compress traces it
        from grailc.llm.layerwise import traced_layer

        gm, about = traced_layer(args.model, args.layer or 0, hidden_target="hidden" in recipe.targets)
        print(about)
    else:
        loaded = load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle)
        model = loaded.exported if loaded.exported is not None else loaded.module
        shapes = input_shapes_for(recipe, loaded, input_names(model))
        gm, _ = capture(model, [tuple(s) for s in shapes])
    ctx = SimpleNamespace(gm=gm, recipe=recipe)
    ANALYSES["deps"](ctx)
    deps = ctx.deps
    print(f"{'id':>5} {'kind':9} {'units':>6} {'x ch':>5} {'prod':>4} {'cons':>4}  producers / pinned because")
    for g in deps.groups.values():
        # a producer split into parts (q, k, v of a fused projection; a branch a shuffle spreads) shows its rows
        labels = list(dict.fromkeys(f"{p.fact.module}[{p.offset}:{p.offset + p.size}]"
                                    if len(p.fact.layout.segments) > 1 else p.fact.module for p in g.producers))
        names = ", ".join(labels[:3]) + (" ..." if len(labels) > 3 else "")
        print(f"{g.id:>5} {g.kind:9} {g.size:>6} {g.granule:>5} {len(g.producers):>4} {len(g.consumers):>4}  {names}"
              + (f"\n{'':38}approximate: {g.lossy}" if g.lossy else "")
              + (f"\n{'':38}pinned: {g.pinned}" if g.pinned else ""))
    print(f"{len(deps.groups)} groups, {len(deps.prunable())} prunable"
          + (f"; unknown ops: {sorted({u['op'] for u in deps.unknown_ops})}" if deps.unknown_ops else ""))
    return 0


def run_compress(args, argv) -> int:
    from grailc.api import compress
    from grailc.calib_data import load_calibration
    from grailc.loading import file_sha256, load_model
    from grailc.outputs import StagedOutput
    from grailc.report import summary
    from grailc.trace import input_names

    start = time.perf_counter()
    _llm_flags(args)
    recipe = recipe_from_args(args)
    _check_inputs_outside_output(args, recipe)
    if args.bench:
        from grailc.bench_command import check_compress_flags

        check_compress_flags(args, recipe)
    if args.model.startswith("hf:"):
        from grailc.llm.commands import LLM_LAM, LLM_RECONSTRUCT_LR

        if recipe.budget:  # compress runs on one decoder layer at a time: the budget would be each layer's own
            given = f"--budget {recipe.budget}" if args.budget else f"the recipe's budget {recipe.budget!r}"
            raise RecipeError(f"{given} spreads one target over the groups of one graph, but a "
                              "decoder LLM is compressed one layer at a time, where it would bind each layer alone",
                              fix="give --ratio R with --structure global (one parameter budget across all "
                                  "layers, FLAP's adaptive structure)")
        if args.lam is None and not args.recipe:
            recipe.lam = LLM_LAM
        if getattr(args, "reconstruct_lr", None) is None and not args.recipe:
            recipe.reconstruct_lr = LLM_RECONSTRUCT_LR
        if recipe.selector == "wanda_pp" and getattr(args, "reconstruct", None) is None and not args.recipe:
            from grailc.passes.select.wanda_pp import regional_optimisation

            # Wanda++ is RGS selection plus regional optimisation: the latter is --reconstruct layer with RMSprop
            given = {k for k in vars(args) if k.startswith("reconstruct_") and getattr(args, k) is not None}
            regional_optimisation(recipe, given)
            recipe.validate()  # puts the 'reconstruct' pass into the pipeline
        return _run_compress_llm(args, argv, recipe, start)
    from grailc.distributed import is_main

    device = device_for(args)  # a --device this machine lacks is refused before anything is loaded
    # only rank 0 of a data-parallel run writes outputs; the others compute the same compile and stop there
    with StagedOutput(args.out, force=args.force) if is_main() else contextlib.nullcontext() as staged:
        model_path = Path(args.model)
        sha_before = file_sha256(model_path) if model_path.is_file() else None
        loaded = load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle)
        t_load = time.perf_counter() - start
        model = loaded.exported if loaded.exported is not None else loaded.module
        names = input_names(model)
        shapes = input_shapes_for(recipe, loaded, names)
        c = recipe.calib
        t0 = time.perf_counter()
        data = load_calibration(c.source, shapes, num_batches=c.batches, batch_size=c.batch_size,
                                mean=c.mean, std=c.std, normalize=c.normalize, seed=c.seed, names=names)
        t_data = time.perf_counter() - t0
        try:
            result = compress(model, input_shape=shapes, calib=data.batches, recipe=recipe, device=device,
                              data_free=data.data_free, progress=not args.quiet and is_main())
            if staged is None:
                return 0
            report = result.report
            _describe_run(report, args, argv, loaded, data, sha_before, t_load, t_data)
            result.write_into(staged, onnx=recipe.export.onnx, pt2=recipe.export.pt2)
            if args.bench:
                from grailc.bench_command import bench_into, settings_from

                bench_into(result, staged, settings_from(args))
        except VerificationError as e:
            if staged is None:
                return e.exit_code
            report = getattr(e, "report", None) or {}
            _describe_run(report, args, argv, loaded, data, sha_before, t_load, t_data)
            report["failure"] = e.line()
            _write_failure(staged, report)
            print(f"grailc: verification failed: {e.line()}; only report.json was written to {args.out}",
                  file=sys.stderr)
            return e.exit_code
        if sha_before is not None and file_sha256(model_path) != sha_before:
            raise GrailcError(f"the input file {model_path} changed during the compile", fix="rerun on a stable copy")
        table = None if args.quiet else summary(report)  # before the commit: a failure here writes nothing
        _stop_if_interrupted()
        out = staged.commit()
        note_written(out)
    if table is not None:
        print(table)
        if "bench" in report:
            from grailc.bench import table as bench_table

            print(bench_table(report["bench"]))
        written = ", ".join(sorted(p.name for p in out.iterdir()))
        print(f"wrote {out}/: {written} ({time.perf_counter() - start:.1f} s)")
    return 0


def _run_compress_llm(args, argv, recipe, start) -> int:
    from grailc.distributed import is_main
    from grailc.llm.commands import llm_summary, not_pruned_notes, run_compress_llm
    from grailc.outputs import StagedOutput

    with StagedOutput(args.out, force=args.force) if is_main() else contextlib.nullcontext() as staged:
        report, _ = run_compress_llm(args, argv, recipe, staged, device_for(args))
        if staged is None:  # not rank 0: rank 0 writes
            return 0
        table = None if args.quiet else llm_summary(report)
        _stop_if_interrupted()
        out = staged.commit()
        note_written(out)
    for line in not_pruned_notes(report, args.model):
        print(f"grailc: note: {line}", file=sys.stderr)
    if table is not None:
        print(table)
        if "bench" in report:
            from grailc.bench import table as bench_table

            print(bench_table(report["bench"]))
        print(f"wrote {out}/ ({time.perf_counter() - start:.1f} s)")
    return 0


def _check_inputs_outside_output(args, recipe) -> None:
    """--force replaces the whole output folder: refuse when the model or the calibration data lie inside it."""
    out = Path(args.out).resolve()
    inputs = [("model file", args.model), ("weights file", args.weights), ("calibration data", recipe.calib.source)]
    for what, name in _input_paths(inputs):
        path = Path(name).resolve()
        if path == out or out in path.parents:
            raise OutputExistsError(
                f"the {what} is inside the output folder, which the compile replaces",
                where=str(name),
                fix="choose an output folder that holds none of the inputs",
            )


def _input_paths(inputs: list[tuple[str, str | None]]) -> list[tuple[str, str]]:
    """The local paths among the inputs: ``hf:FOLDER`` by its folder, ``text:SOURCE`` by the files it names
    (``grailc.llm.text.text_files``); ``torchvision:NAME``, ``timm:NAME`` and ``random`` name no file."""
    from grailc.errors import CalibrationError
    from grailc.llm.commands import HF_PREFIX, TEXT_PREFIX, model_folder, text_path
    from grailc.llm.text import text_files

    found = []
    for what, name in inputs:
        if name and name.startswith(TEXT_PREFIX):
            try:
                found += [(what, str(path)) for path in text_files(text_path(name))]
            except CalibrationError:  # no text there: refused later, with its own message, before anything is written
                pass
            continue
        if name and name.startswith(HF_PREFIX):
            name = str(model_folder(name))
        if not name or name == "random" or (":" in name and not Path(name).exists()):
            continue
        found.append((what, name))
    return found


def _describe_run(report, args, argv, loaded, data, sha_before, t_load, t_data) -> None:
    from grailc.report import versions

    report["command"] = "grailc " + shlex.join(argv)
    report["model"] = {"source": loaded.source, "sha256": sha_before}
    report["calibration"] = {"source": data.source, "batches": len(data.batches), "data_free": data.data_free}
    report["data_free"] = data.data_free
    report.setdefault("timings", {})
    report["timings"]["load"] = round(t_load, 4)
    report["timings"]["calibration_data"] = round(t_data, 4)
    report.setdefault("versions", versions())


def _write_failure(staged, report) -> None:
    from grailc.outputs import atomic_write_text

    for name in ("model.pt2", "model.onnx"):
        p = staged.path(name)
        if p.exists():
            p.unlink()
    atomic_write_text(staged.path("report.json"), json.dumps(report, indent=2, default=str))
    staged.commit()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
