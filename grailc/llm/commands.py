"""The CLI for decoder LLMs: ``grailc compress hf:PATH --calib text:FILE ...`` and ``grailc ppl MODEL --text FILE``."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import torch

from grailc.errors import RecipeError

HF_PREFIX, TEXT_PREFIX = "hf:", "text:"
# the ridge for decoder LLMs when none is given: a few thousand calibration tokens against MLP widths in the
# thousands overfit at the CNN default 1e-3 (README, "Decoder LLMs")
LLM_LAM = 0.1
# reconstruct's learning rate for hf: models: on SmolLM2 (8 layers, 2,048 tokens each) 3e-3 overfit (perplexity
# 38.9 -> 64.2) where 1e-4 gained a little (38.9 -> 37.9); see README, Local reconstruction
LLM_RECONSTRUCT_LR = 1e-4
BENCH_TOKENS = 128  # the sequence length --bench measures decoders at (MACs per sequence of this many tokens)


def model_folder(spec: str) -> Path:
    """``hf:PATH`` or a folder written by ``grailc compress hf:...``."""
    return Path(spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec)


def text_path(source: str | None) -> str:
    """The file, folder or glob pattern of ``text:SOURCE`` (see :func:`grailc.llm.text.text_files`)."""
    if not source or not source.startswith(TEXT_PREFIX):
        raise RecipeError(f"a language model is calibrated on text, not {source!r}",
                          fix="give --calib text:FILE.txt (or text:FOLDER of .txt files)")
    return source[len(TEXT_PREFIX):]


def run_compress_llm(args, argv, recipe, staged, device: torch.device | None = None) -> tuple[dict, Path | None]:
    """Compress an HF causal LM layer by layer (each layer on ``device``; default the CPU) into the staged output;
    returns the report and the folder. ``staged`` None (a data-parallel process other than rank 0): compress only,
    write nothing."""
    from grailc.bench_command import COMPRESSED, DENSE, measure, settings_from
    from grailc.llm.export import decoder_macs, export_decoder_onnx
    from grailc.llm.hf import load_causal_lm, save_causal_lm
    from grailc.llm.layerwise import compress_layers, decoder_parts, parse_layers
    from grailc.llm.text import calibration_windows, check_window_counts, read_tokens, text_files
    from grailc.metrics import count_params
    from grailc.outputs import atomic_write_text
    from grailc.report import versions

    start = time.perf_counter()
    streamed = getattr(args, "stream", False)
    if streamed:
        from grailc.llm.stream import StreamedModel, check_streamable

        check_streamable(recipe)
    check_window_counts(calib_samples=args.calib_samples, seq_len=args.seq_len)
    source = text_path(recipe.calib.source)
    files = text_files(source)  # before the model is loaded
    stream = None
    if streamed:  # built without weights; each decoder layer read from disk for its turn (grailc.llm.stream)
        stream = StreamedModel(model_folder(args.model), staged.staging_dir if staged is not None else None)
        model, tokenizer = stream.model, stream.tokenizer
    else:
        model, tokenizer = load_causal_lm(model_folder(args.model))
    t_load = time.perf_counter() - start
    documents = [read_tokens(tokenizer, path) for path in files]
    windows = calibration_windows(documents, args.calib_samples, args.seq_len, recipe.calib.seed, path=source)
    params_before = count_params(model)
    only = parse_layers(args.layers, len(decoder_parts(model)[0]))
    recipe = recipe.resolved(llm=True)
    macs_before = decoder_macs(model, BENCH_TOKENS)
    bench = getattr(args, "bench", False) and staged is not None
    if bench:  # the dense decoder, exported before it is compressed in place
        dense_onnx = export_decoder_onnx(model, windows[:1, : min(64, windows.shape[1])], staged.path(DENSE))
    report = compress_layers(model, windows, recipe, structure=args.structure, only=only,
                             progress=not args.quiet and staged is not None, device=device, stream=stream)
    if staged is None:
        return report, None
    fmt = stream.save() if stream is not None else save_causal_lm(model, tokenizer, staged.staging_dir)
    report.update({
        "command": "grailc " + shlex.join(argv),
        "model": {"source": args.model},
        "calibration": {"source": str(source), "samples": args.calib_samples, "seq_len": args.seq_len,
                        "files": [str(path) for path in files],
                        "tokens": int(sum(d.numel() for d in documents))},
        "recipe": {k: getattr(recipe, k) for k in ("ratio", "selector", "compensate", "lam", "compensate_target",
                                                   "targets", "sequential", "reconstruct", "reconstruct_steps",
                                                   "reconstruct_lr", "reconstruct_params", "reconstruct_rank",
                                                   "reconstruct_batch", "reconstruct_fed",
                                                   "reconstruct_optimizer")},
        "params_before": params_before,
        "params_after": count_params(model),
        "macs_before": macs_before,  # per sequence of macs_tokens tokens (grailc.llm.export.decoder_macs)
        "macs_after": decoder_macs(model, BENCH_TOKENS),
        "macs_tokens": BENCH_TOKENS,
        "saved_as": {"config": "a plain Hugging Face folder (its config describes every shape)",
                     "shapes": "config + grailc_shapes.json (per-layer widths, or biases the config has no "
                               "switch for): load with grailc"}[fmt],
        "timings": {"load": round(t_load, 3), "compress": report["seconds"]},
        "versions": versions(),
    })
    if stream is not None:
        report["stream"] = stream.record()
    if not args.no_onnx and stream is not None:
        from grailc.llm.stream import ONNX_SKIPPED

        report["onnx"] = {"skipped": ONNX_SKIPPED}
    elif not args.no_onnx:
        t0 = time.perf_counter()
        report["onnx"] = export_decoder_onnx(model, windows[:1, : min(64, windows.shape[1])],
                                             staged.path("model.onnx"))
        report["onnx"]["path"] = "model.onnx"
        report["timings"]["export"] = round(time.perf_counter() - t0, 3)
    if bench:
        report["bench"] = measure(staged.path(DENSE), staged.path(COMPRESSED), report, settings_from(args))
        report["bench"]["dense_onnx"] = {k: dense_onnx[k] for k in ("max_abs_diff", "relative_diff", "opset")}
    atomic_write_text(staged.path("report.json"), json.dumps(report, indent=2, default=str))
    return report, staged.staging_dir


def llm_summary(report: dict) -> str:
    layers = report["layers"]
    kept = [f"{l['after']['intermediate_size']}/{l['after']['num_attention_heads']}h" for l in layers]
    errs = [g["recon_error_grail"] for l in layers for g in l["groups"] if g["recon_error_grail"] is not None]
    lines = [
        f"layers: {len(layers)}   params {report['params_before']:,} -> {report['params_after']:,} "
        f"({report['params_after'] / report['params_before']:.3f}x)",
        "kept per layer (MLP width / query heads): " + " ".join(kept) if kept else "",
        hidden_summary(report.get("hidden")),
        f"mean reconstruction error (relative): {sum(errs) / len(errs):.4f}" if errs else "",
        ("biases added for the compensation's offsets, config switched on: "
         + ", ".join(report["biases_switched_on"])) if report.get("biases_switched_on") else "",
        f"time {report['seconds']:.1f} s, peak RSS {report['peak_rss_mib']:.0f} MiB",
        f"ONNX {report['onnx']['skipped']}" if "skipped" in report.get("onnx", {}) else "",
    ]
    return "\n".join(line for line in lines if line)


def not_pruned_notes(report: dict, model: str) -> list[str]:
    """One line per target the analysis pinned (``targets_not_pruned``): which layers, why, and where to look."""
    return [f"{name} not pruned in decoder layers {_ranges(item['layers'])}: {item['why']} (grailc groups {model} "
            f"--layer {item['layers'][0]} lists the layer's groups)"
            for name, item in report.get("targets_not_pruned", {}).items()]


def _ranges(layers: list[int]) -> str:
    """0, 1, 2, 5 -> '0-2,5'."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def hidden_summary(hidden: dict | None) -> str:
    """One line for the hidden width, when it was pruned."""
    if not hidden:
        return ""
    errs = [n["recon_error_grail"] if n["recon_error_grail"] is not None else n["recon_error_plain"]
            for n in hidden["norms"]]
    mean = f", mean norm-consumer error {sum(errs) / len(errs):.4f}" if errs else ""
    return f"hidden width {hidden['size']} -> {hidden['kept']}{mean} (approximate: {hidden['approximate']})"


def run_ppl(args) -> int:
    """Perplexity of a model over non-overlapping windows of a text file; the last stdout line is JSON."""
    from grailc.cli import device_for
    from grailc.llm.hf import load_causal_lm
    from grailc.llm.text import check_text_file, check_window_counts, eval_windows, perplexity, read_tokens

    start = time.perf_counter()
    check_window_counts(2, seq_len=args.seq_len)
    check_window_counts(windows=args.windows, batch_size=args.batch_size)
    text = check_text_file(args.text, flag="--text FILE.txt")
    device = device_for(args)  # before the model is loaded: a device that is not there is refused first
    model, tokenizer = load_causal_lm(model_folder(args.model))
    model.to(device)
    windows = eval_windows(read_tokens(tokenizer, text), args.seq_len, args.windows, path=args.text)
    with torch.no_grad():
        ppl = perplexity(model, windows, args.batch_size)
    result = {"ppl": round(ppl, 4), "windows": int(windows.shape[0]), "seq_len": args.seq_len,
              "text": str(args.text), "model": args.model, "device": str(device),
              "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(result))
    sys.stdout.flush()
    return 0
