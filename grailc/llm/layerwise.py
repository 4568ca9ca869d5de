"""Layer-by-layer compression of a decoder-only LM through the ordinary pipeline.

Each decoder layer is wrapped as a one-input module (hidden states in, hidden states out; rotary embeddings
computed inside, causal attention without a mask) and compressed by :func:`grailc.compress` exactly like any other
model: trace, analysis (MLP channels, attention heads with grouped-query units), Grams, selection, compensation,
rewrite and the permutation self-check. The narrowed weights are copied back into the Hugging Face layer, and
layer i+1 is calibrated on the outputs of the *compressed* layer i. Memory holds one layer's inputs and Grams:

    calibration activations   N * T * d * 4 bytes        (N samples of T tokens, hidden width d, float32)
    Grams (float64)           8 * (f^2 + (h * d_h)^2)    (MLP width f, attention width h * d_h)

plus the model's weights. With ``compensate_target="stream"`` the dense model's own stream is carried too (another
N * T * d * 4 bytes) and feeds each layer's dense run, so that the consumers writing into the residual stream
rebuild the dense model's stream, not the dense layer's output on the compressed input. The hidden (residual)
width runs through every layer and the embedding, so it cannot be cut layer by layer: ``--targets hidden`` narrows
it first, on the whole model (:mod:`grailc.llm.hidden`), and the other targets then run layer by layer on the
narrowed model.

``structure="incremental"`` is SlimGPT's incremental pruning ratio: deeper layers lose more, in proportion to
ln(2 + layer index), the mean over the layers being the recipe's ratio.

``structure="global"`` is FLAP's adaptive structure (AL-AM): a first pass over the dense model scores every unit
of every layer with the fluctuation metric, standardises the scores within each layer and kind (heads / MLP),
and keeps the best units across the whole model under one parameter budget; the second pass then compresses
layer by layer with those per-layer counts, the selector choosing which units on the layer's actual input.

``device``: the model stays where it is (the CPU for ``grailc compress hf:``); each decoder layer is moved to the
compute device while it is scored, compressed and run, then moved back, so the device holds one layer's weights,
the calibration activations and one layer's Grams. Data-parallel (``torchrun``, :mod:`grailc.distributed`): each
process embeds and carries through the layers only its share of the calibration batches (batch i of
``batch_size`` windows on rank i % W); the statistics are summed over the processes inside each layer's compile
(the Calibrate pass), and the global plan's scores come from the same summed statistics.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import resource
import time

import torch
from tqdm import tqdm

from grailc.distributed import shard, world
from grailc.errors import GrailcError, RecipeError
from grailc.llm.hf import (
    adopt_weights,
    built_biases,
    complete_biases,
    follow_widths,
    head_dim_of,
    layer_widths,
    switch_on_biases,
)
from grailc.llm.stream import check_streamable, resident
from grailc.recipe import Recipe

STRUCTURES = ("uniform", "global", "incremental")
OFFSET_COMPENSATORS = ("bias", "grail+bias")  # those that move an offset into the consumer's bias
ADOPTION_TOLERANCE = 1e-4  # relative: the Hugging Face layer with the narrowed weights against the compressed graph
MAX_LAYER_RATIO = 0.95
KIND_PATTERN = {"heads": "layer.self_attn.*", "channels": "layer.mlp.*"}


class DecoderBlock(torch.nn.Module):
    """One decoder layer as a function of its hidden states alone (positions 0..T-1, causal attention). Where the
    rotary embedding differs by layer type (Gemma 3: sliding and full attention), it is asked for this layer's."""

    def __init__(self, layer: torch.nn.Module, rotary: torch.nn.Module):
        super().__init__()
        self.layer, self.rotary = layer, rotary
        typed = "layer_type" in inspect.signature(rotary.forward).parameters
        self.layer_type = getattr(layer.self_attn, "layer_type", None) if typed else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        typed = () if self.layer_type is None else (self.layer_type,)
        cos, sin = self.rotary(hidden, positions, *typed)
        out = self.layer(hidden, position_ids=positions, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out


def check_block_runs(block: DecoderBlock, index: int, hidden: torch.Tensor) -> None:
    """A clear refusal where a decoder layer does not run as a one-input block (hidden states in, the rotary
    embedding and positions computed inside), before anything is compressed."""
    try:
        with torch.no_grad():
            block(hidden)
    except Exception as e:
        raise RecipeError(
            f"decoder layer {index} ({type(block.layer).__name__}) does not run as grailc calls it layer by layer "
            f"(hidden states, position ids and rotary embeddings): {type(e).__name__}: {e}",
            fix="use a LLaMA-family model (LLaMA, Mistral, Qwen, Gemma, Phi-3: see the README), or export the "
                "model to .pt2 and compress it whole",
        ) from e


def decoder_parts(model) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """The decoder layers and the rotary embedding of a LLaMA-family causal LM, or a clear refusal."""
    inner = getattr(model, "model", None)
    layers, rotary = getattr(inner, "layers", None), getattr(inner, "rotary_emb", None)
    if layers is None or rotary is None or not all(hasattr(l, "self_attn") and hasattr(l, "mlp") for l in layers):
        raise RecipeError(
            f"{type(model).__name__} is not a LLaMA-family decoder (model.layers with self_attn and mlp, and "
            "model.rotary_emb): grailc compresses those layer by layer",
            fix="use a LLaMA-family model (LLaMA, Mistral, Qwen, Gemma, Phi-3: see the README), or export the "
                "model to .pt2 and compress it whole",
        )
    return layers, rotary


def traced_layer(spec: str, index: int, hidden_target: bool = False, tokens: int = 8):
    """``grailc groups hf:FOLDER``: decoder layer ``index`` traced as compress traces it (on random hidden states of
    ``tokens`` positions), and a line saying which layer of how many and how the hidden width is treated."""
    from grailc.llm.commands import model_folder
    from grailc.llm.hf import load_causal_lm
    from grailc.trace import capture

    model, _ = load_causal_lm(model_folder(spec))
    layers, rotary = decoder_parts(model)
    if not 0 <= index < len(layers):
        raise RecipeError(f"--layer {index}, but the model has layers 0-{len(layers) - 1}")
    hidden = torch.randn(1, tokens, model.config.hidden_size, dtype=next(model.parameters()).dtype)
    gm, _ = capture(DecoderBlock(layers[index], rotary), [tuple(hidden.shape)], data=(hidden,))
    stream = ("pruned across all layers (--targets hidden; approximate through RMSNorm)" if hidden_target
              else "kept (--targets hidden prunes it across all layers)")
    return gm, (f"decoder layer {index} of {len(layers)} ({type(layers[index]).__name__}), as compress traces it "
                f"layer by layer; hidden width {model.config.hidden_size}: {stream}")


class _Captured(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The hidden states entering decoder layer 0 for each batch of token windows."""
    found: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        found.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Captured

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    home = next(model.parameters()).device
    try:
        for chunk in windows.split(batch_size):
            try:
                model(chunk.to(home), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return found


def shared_inputs(model, windows: torch.Tensor, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """The hidden states entering layer 0 for this process's share of the windows (all of them in one process):
    batch i of ``batch_size`` windows goes to rank i % W; on ``device``."""
    chunks = shard(list(windows.split(batch_size)), "calibration batches (--calib-samples / --batch-size)")
    return [x.to(device) for x in first_layer_inputs(model, torch.cat(chunks), batch_size)]


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device, home: torch.device):
    """``module``'s weights on ``device`` inside the block, back on ``home`` after (a no-op when they are equal)."""
    if device == home:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_cuda_mib(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_cuda_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}


def _layer_recipe(recipe: Recipe, ratios: dict[str, float] | None) -> Recipe:
    r = copy.deepcopy(recipe)
    r.calib = dataclasses.replace(r.calib, held_out=0)
    r.input_shape = None
    if ratios is not None:
        r.ratios = dict(ratios)
    return r


def parse_layers(text: str | None, count: int) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8]; None -> every layer."""
    if not text:
        return list(range(count))
    chosen = set()
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            first, last = int(a), int(b or a)
            if last < first:
                raise RecipeError(f"--layers {text!r}: the range {part.strip()} is empty",
                                  fix=f"write the lower layer first, e.g. --layers {last}-{first}")
            chosen.update(range(first, last + 1))
    except ValueError:
        raise RecipeError(f"--layers {text!r} is not a list of layer ranges", fix="e.g. --layers 0-3,8") from None
    bad = sorted(i for i in chosen if not 0 <= i < count)
    if bad:
        raise RecipeError(f"--layers names layer {bad[0]}, but the model has layers 0-{count - 1}")
    return sorted(chosen)


def compress_layers(model, windows: torch.Tensor, recipe: Recipe, *, structure: str = "uniform",
                    only: list[int] | None = None, progress: bool = False,
                    device: torch.device | str | None = None, stream=None) -> dict:
    """Compress the decoder layers of ``model`` (all, or those listed in ``only``) in place; returns the report
    (per layer: kept widths, reconstruction errors, timings, peak memory). ``stream``
    (:class:`grailc.llm.stream.StreamedModel`): the layers are on the meta device and each is read from disk for
    its turn, then written out and freed. Each layer is computed on ``device``
    (default: where the model is) and moved back after."""
    from grailc.recipe import TARGETS

    hidden = "embed" in {TARGETS[t] for t in recipe.targets}
    if stream is not None:
        check_streamable(recipe)
    if "vdims" in {TARGETS[t] for t in recipe.targets}:
        raise RecipeError("value dims inside heads cannot be pruned in a Hugging Face decoder layer: it has one "
                          "head_dim for queries, keys and values",
                          fix="use --targets mlp,heads for decoder LLMs")
    if structure not in STRUCTURES:
        raise RecipeError(f"unknown structure {structure!r}", fix=f"use one of {', '.join(STRUCTURES)}")
    layers, rotary = decoder_parts(model)
    check_windows_fit(layers, model.config, int(windows.shape[1]))
    recipe = recipe.resolved(llm=True)
    biases = switch_on_biases(model, offset_linears(recipe))
    target = None
    if recipe.compensate_target == "stream":
        recipe, target = stream_or_input(model, windows, recipe)
    batch_size = recipe.calib.batch_size
    start = time.perf_counter()
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    batches = shared_inputs(model, windows, batch_size, device)
    with on_device(rotary, device, home):
        found = {}
        if hidden:  # first, on the whole model; then the other targets layer by layer on the narrowed one
            from grailc.llm.hidden import prune_hidden, without_hidden

            found, batches = prune_hidden(model, batches, recipe, device=device, home=home, progress=progress)
            recipe = without_hidden(recipe)
            only = only if recipe.targets else []
        report = _compress_layers(model, batches, recipe, structure, only, progress, device, home, start,
                                  {"samples": int(windows.shape[0]), "seq_len": int(windows.shape[1])}, stream)
        if target is not None:
            report["compensate_target"] = target
        if biases:
            report["biases_switched_on"] = biases
        return {**report, "hidden": found} if hidden else report


def _compress_layers(model, batches, recipe, structure, only, progress, device, home, start, sizes,
                     stream=None) -> dict:
    """compress_layers with the first layer's inputs (this process's share, on ``device``) and the rotary
    embedding on ``device``."""
    from grailc.api import compress
    from grailc.trace_reuse import Traces

    layers, rotary = decoder_parts(model)
    head_dim = head_dim_of(model.config)
    chosen = set(range(len(layers)) if only is None else only)
    plan = (global_plan(model, batches, recipe, chosen, progress, device=device, stream=stream)
            if structure == "global"
            else incremental_plan(len(layers), chosen, recipe.ratio) if structure == "incremental" else None)
    report = {"layers": [], "structure": structure, **sizes, "device": str(device), "processes": world()}
    if plan is not None:
        report["global_plan"] = plan
    traces = Traces()  # every layer built like one traced before reuses its graph
    built = built_biases(model.config)
    dense = list(batches) if recipe.compensate_target == "stream" else None  # the dense model's own stream
    for i in tqdm(range(len(layers)), desc="layers", unit="layer", disable=not progress, leave=False):
        t0 = time.perf_counter()
        block = DecoderBlock(layers[i], rotary)
        with resident(stream, i, write=True, traced=i in chosen), on_device(layers[i], device, home):
            if i == min(chosen, default=None):
                check_block_runs(block, i, batches[0][:1])
            if i not in chosen:
                advance(block, batches, dense)
                complete_biases(layers[i], i, built)
                continue
            before = layer_widths(layers[i], head_dim)
            ratios = plan["ratios"][i] if plan is not None else None
            result = compress(block, calib=batches, recipe=_layer_recipe(recipe, ratios), measure_latency=False,
                              sharded=True, traces=traces, dense_calib=dense)
            advance(block, dense)  # the layer is still dense
            with torch.no_grad():
                expected = result.module(batches[0])
            adopt_weights(block, result.module)
            follow_widths(layers[i], head_dim)
            advance(block, batches)
            check_adopted(i, expected, batches[0])
            complete_biases(layers[i], i, built)
        groups = [g for g in result.report["groups"] if g["kept"] < g["size"]]
        report["layers"].append({
            "layer": i,
            "before": before,
            "after": layer_widths(layers[i], head_dim),
            "groups": [{k: g[k] for k in ("kind", "size", "kept", "recon_error_plain", "recon_error_grail",
                                           "compensation_refused")} for g in groups],
            "permutation_error": result.report.get("verification", {}).get("permutation_error"),
            "graph": traces.last,
            **({"pinned": pinned} if (pinned := pinned_targets(result.report["groups"], recipe)) else {}),
            **({"stream_writers": len(result.report["stream_writers"]),
                "stream_writers_few_rows": len(result.report["stream_writers_few_rows"])}
               if "stream_writers" in result.report else {}),
            **_reconstruct_record(result.report),
            "seconds": round(time.perf_counter() - t0, 3),
            "peak_rss_mib": round(_peak_rss_mib(), 1),
            **_peak_cuda_mib(device),
        })
    not_pruned = {}
    for layer in report["layers"]:
        for name, why in layer.get("pinned", {}).items():
            not_pruned.setdefault(name, {"layers": [], "why": why})["layers"].append(layer["layer"])
    if not_pruned:
        report["targets_not_pruned"] = not_pruned
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    report.update(_peak_cuda_mib(device))
    return report


TARGET_CONSUMERS = {"mlp": ("channels", "mlp.down_proj"), "heads": ("heads", "self_attn.o_proj")}


def pinned_targets(groups: list[dict], recipe: Recipe) -> dict[str, str]:
    """Per target of the recipe (mlp, heads) that the analysis pinned in a decoder layer, why: the reason of the
    pinned group that the target's consumer (down_proj, o_proj) reads."""
    from grailc.recipe import TARGETS

    asked = {TARGETS[t] for t in recipe.targets}
    found = {}
    for name, (kind, consumer) in TARGET_CONSUMERS.items():
        if kind not in asked:
            continue
        for g in groups:
            if g["pinned"] and any(c.endswith(consumer) for c in g["consumers"]):
                found[name] = (f"approximate, not pruned in a decoder layer: {g['approximate']}" if g["approximate"]
                               else g["pinned"])
    return found


def sliding_window(layer, config) -> int | None:
    """The sliding attention window of a decoder layer in tokens (None: full causal attention): the attention's own
    (Qwen2, Qwen3: per layer type), else the config's (Mistral: every layer)."""
    attn = layer.self_attn
    return attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)


def check_windows_fit(layers, config, seq_len: int) -> None:
    """Refuse calibration windows longer than a layer's sliding attention window: ``DecoderBlock`` runs every layer
    with full causal attention, which is the model's own only up to the window."""
    for i, layer in enumerate(layers):
        window = sliding_window(layer, config)
        if window is not None and seq_len > window:
            raise RecipeError(f"calibration windows of {seq_len} tokens are longer than decoder layer {i}'s sliding "
                              f"attention window ({window} tokens): each layer is calibrated with full causal "
                              "attention, which differs from the model's beyond the window",
                              fix=f"use --seq-len {window} or less")


def offset_linears(recipe: Recipe) -> list[str]:
    """The linears (names inside a decoder layer) that the recipe's compensation gives an offset: ``down_proj``
    (MLP targets) and ``o_proj`` (heads), built without a bias in LLaMA-family layers."""
    from grailc.recipe import TARGETS

    if recipe.compensate not in OFFSET_COMPENSATORS:
        return []
    kinds = {TARGETS[t] for t in recipe.targets}
    return [name for name, kind in (("mlp.down_proj", "channels"), ("self_attn.o_proj", "heads")) if kind in kinds]


def check_adopted(layer: int, expected: torch.Tensor, got: torch.Tensor) -> None:
    """The self-check of the copy back: the Hugging Face layer with the narrowed weights must give the compressed
    graph's output on the first calibration batch (a weight or bias left behind shows up here)."""
    err = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    if not err <= ADOPTION_TOLERANCE:
        raise GrailcError(f"decoder layer {layer}: with the compressed weights copied back, the Hugging Face layer "
                          f"differs from the compressed graph by {err:.2e} (relative, max), over the "
                          f"{ADOPTION_TOLERANCE:.0e} allowed", fix="report this as a bug, with the model's config")


def stream_or_input(model, windows: torch.Tensor, recipe: Recipe) -> tuple[Recipe, dict]:
    """The stream target needs ``STREAM_ROWS_PER_CHANNEL`` calibration tokens per kept channel of its widest writer
    (see ``passes/calibrate.py``). A decoder layer's dense run is fed the dense model's stream, so a writer without
    enough rows could not fall back to its own input target; the choice is made here, once for the run, at the
    recipe's ratio: the recipe (with the input target where the tokens are too few) and the report's record."""
    from grailc.passes.calibrate import STREAM_ROWS_PER_CHANNEL
    from grailc.recipe import TARGETS

    config, kinds = model.config, {TARGETS[t] for t in recipe.targets}
    widths = ([config.intermediate_size] if "channels" in kinds else []) + (
        [config.num_attention_heads * head_dim_of(config)] if "heads" in kinds else [])
    kept = max((round(w * (1.0 - recipe.ratio)) for w in widths), default=0)
    tokens, need = int(windows.numel()), STREAM_ROWS_PER_CHANNEL * kept
    record = {"asked": "stream", "used": "stream" if tokens >= need else "input", "tokens": tokens,
              "tokens_needed": need}
    if tokens < need:
        record["why"] = (f"{tokens} calibration tokens, under {STREAM_ROWS_PER_CHANNEL} per kept channel of the "
                         f"widest writer ({kept} kept): the drift would fit the calibration rows' noise")
        recipe = dataclasses.replace(recipe, compensate_target="input")
    return recipe, record


def advance(block: torch.nn.Module, *streams: list[torch.Tensor] | None) -> None:
    """Feed every batch of each stream (None: none) through ``block``, replacing it in place, so that a stream never
    takes more than its own size plus one batch."""
    with torch.no_grad():
        for stream in streams:
            for j, x in enumerate(stream or ()):
                stream[j] = block(x)


def _reconstruct_record(report: dict) -> dict:
    """The layer's reconstruction (windows inside the layer, error before -> after, seconds), when it ran."""
    rc = report.get("reconstruct")
    if not rc or rc.get("kind", "off") == "off":
        return {}
    return {"reconstruct": {
        "windows": [{k: w[k] for k in ("window", "loss_before", "loss_after", "skipped", "kept_weights") if k in w}
                    for w in rc["windows"]],
        "optimizer": rc.get("optimizer"),
        "seconds": rc["seconds"],
        "cached_activations_mib": rc["cached_activations_mib"],
    }}


def incremental_plan(count: int, chosen: set[int], ratio: float) -> dict:
    """SlimGPT's incremental pruning ratio: deeper layers lose more, logarithmically in depth, averaging ``ratio``
    over the chosen layers: r_l = ratio * ln(2 + l) / mean_l ln(2 + l), capped at 0.95."""
    layers = sorted(chosen)
    weights = {i: math.log(2 + i) for i in layers}
    mean = sum(weights.values()) / max(1, len(layers))
    ratios = [{} for _ in range(count)]
    for i in layers:
        r = min(MAX_LAYER_RATIO, ratio * weights[i] / mean)
        ratios[i] = {pattern: r for pattern in KIND_PATTERN.values()}
    return {"ratios": ratios, "per_layer": {i: round(ratios[i][KIND_PATTERN["channels"]], 4) for i in layers}}


def layer_statistics(block: torch.nn.Module, batches: list[torch.Tensor], recipe: Recipe, traces=None):
    """Trace (or reuse a graph of ``traces``), analyse and calibrate one block (no selection): the Context holding
    its groups, Grams and sums."""
    from grailc.context import Context
    from grailc.passmanager import run_pipeline
    from grailc.trace import capture

    gm, example = capture(block, [tuple(batches[0].shape)], data=(batches[0],), traces=traces)
    dense = dataclasses.replace(_layer_recipe(recipe, None), sequential=False)  # scores of the dense layer
    ctx = Context(gm=gm, reference=gm, example=example, recipe=dense, calib=[(x,) for x in batches], progress=False)
    run_pipeline(ctx, ["analyse", "calibrate"])
    return ctx


def unit_cost(ctx, group) -> float:
    """Parameters removed with one unit: its rows in every producer and its columns in every consumer."""
    from grailc.surgery import get_param

    total = 0
    for slot in [*group.producers, *group.consumers]:
        w = get_param(ctx.gm, slot.fact.weight)
        total += w.numel() // w.shape[slot.fact.dim] * slot.size
    return total / group.size


def _standardised_unit_scores(ctx, group) -> torch.Tensor:
    """FLAP's per-layer standardisation: channel scores to zero mean and unit variance, then a unit's mean."""
    from grailc.passes.select.flap import fluctuation

    units = torch.zeros(group.size, dtype=torch.float64)
    for slot in group.consumers:
        s = fluctuation(ctx, slot)
        s = (s - s.mean()) / s.std().clamp_min(1e-300)
        units += s.reshape(group.size, -1).mean(1)
    return units / max(1, len(group.consumers))


@torch.no_grad()
def global_plan(model, batches, recipe: Recipe, chosen: set[int], progress: bool = False,
                device: torch.device | None = None, stream=None) -> dict:
    """FLAP's adaptive structure: per-layer unit counts from standardised fluctuation scores under one budget,
    the units with the highest scores kept until (1 - ratio) of the prunable parameters is reached (at least one
    unit per group). ``batches`` (this process's share, on ``device``) feed layer 0; each layer is scored on
    ``device``; with ``stream`` each dense layer is read from disk for its scores and freed again."""
    from grailc.recipe import TARGETS
    from grailc.trace_reuse import Traces

    targets = {TARGETS[t] for t in recipe.targets}
    traces = Traces()
    units = []  # (score, cost, layer, kind)
    sizes: dict[tuple[int, str], int] = {}
    for i, layer in enumerate(tqdm(model.model.layers, desc="scores", unit="layer", disable=not progress,
                                   leave=False)):
        block = DecoderBlock(layer, model.model.rotary_emb)
        home = next(model.parameters()).device  # the embedding's: a streamed layer is on meta until its turn
        with resident(stream, i, write=False, traced=i in chosen), on_device(layer, device or home, home):
            if i not in chosen:
                batches = [block(x) for x in batches]
                continue
            ctx = layer_statistics(block, batches, recipe, traces)
            for group in ctx.deps.prunable():
                if group.target not in targets or group.size < 2:
                    continue
                cost = unit_cost(ctx, group)
                sizes[(i, group.target)] = group.size
                units += [(float(s), cost, i, group.target) for s in _standardised_unit_scores(ctx, group)]
            batches = [block(x) for x in batches]  # the dense model's own outputs feed the next layer's scores
    total = sum(u[1] for u in units)
    budget = (1.0 - recipe.ratio) * total
    kept = {key: 0 for key in sizes}
    spent = 0.0
    for _, cost, i, kind in sorted(units, key=lambda u: -u[0]):
        if kept[(i, kind)] == 0 or spent + cost <= budget:
            kept[(i, kind)] += 1
            spent += cost
    ratios = [{KIND_PATTERN[kind]: 1.0 - kept[(j, kind)] / sizes[(j, kind)] for (j, kind) in sizes if j == i}
              for i in range(len(model.model.layers))]
    return {"ratios": ratios, "kept": {f"{i}.{kind}": k for (i, kind), k in kept.items()},
            "kept_fraction": round(spent / max(1e-300, total), 4)}
