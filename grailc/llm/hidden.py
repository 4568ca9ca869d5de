"""The hidden (residual) width of a decoder LM: one kept set K of the d residual channels for the whole model.

The residual stream is one space from the embedding through every layer to the final norm: the embedding's columns,
every ``o_proj`` and ``down_proj`` row (the writers) and every RMSNorm weight are sliced to K, exactly. The readers
sit behind an RMSNorm, y = w * h / rms(h), whose mean square over the k kept channels differs from the one over d:
this is the approximation, and why the report marks the group ``approximate``.

1. **Scores** (a pass over the dense model): for every norm n, the residual stream's own energy s_n[c] = ||h_c||
   over the calibration tokens (h the norm's input), normalised to sum 1 per norm so that each of the 2L + 1 norms
   weighs the same; K is the top k of sum_n s_n (``score="wanda"``: the Wanda-like ||x_c|| * sum_W ||W[:, c]|| of
   the norm's output x and its consumers W, q/k/v, gate/up, lm_head; with GRAIL on SmolLM2 the residual energy
   gave perplexity 66.96 against 68.43 at ratio 0.1 and 135.91 against 157.95 at 0.2, README "The hidden width").
2. **Rewrite** (a second pass, layer by layer): the dense stream x and the narrowed model's stream z are carried
   side by side. Per norm, the narrowed norm (weight w_K) gives z; ``correction="fit"`` scales its weight by a, the
   least-squares fit of the consumers' outputs, min_a sum ||W x - a W[:, K] z||^2 (the correction for the mean
   square over k channels; "channel" fits the norm's own output; the default "off" keeps a = 1: on SmolLM2 the fit
   gained 0.2% perplexity under GRAIL and lost 29% with plain slicing, README "The hidden width"), then the
   consumers read W' = W B with GRAIL's map from the cross Gram (the sequential form; ``--one-shot``: the dense
   Gram alone), which absorbs a global scale itself:

       B = (C[:, K] + r I[:, K]) (Gz + r I)^-1,   C = sum x z^T,   Gz = sum z z^T,   r = lam * mean diag Gz

   ``--compensate none`` keeps W[:, K]; a map whose error exceeds plain slicing's is refused, as elsewhere.
3. **The head.** A tied ``lm_head`` is the embedding: compensating it would untie it (vocab * k more parameters),
   so it stays tied and is sliced (``untie=True`` unties it and compensates it like the other consumers).

Memory: one layer's weights, the two streams and the dense norm outputs (4 * N * T * d * 4 bytes), and two d x d
float64 Grams.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from grailc.distributed import all_reduce_stats
from grailc.errors import RecipeError
from grailc.llm.hf import replace_parameter

F64 = torch.float64
SCORES = ("wanda", "residual")
NORM_CORRECTIONS = ("fit", "channel", "off")
NORM_CHECK_TOL = 1e-4
APPROXIMATE = "RMSNorm computes its mean square over the kept channels only (statistics approximated)"


def _consumers(layer) -> dict[str, list[torch.nn.Linear]]:
    attn, mlp = layer.self_attn, layer.mlp
    return {"input_layernorm": [attn.q_proj, attn.k_proj, attn.v_proj],
            "post_attention_layernorm": [mlp.gate_proj, mlp.up_proj]}


def _writers(layer) -> list[torch.nn.Linear]:
    return [layer.self_attn.o_proj, layer.mlp.down_proj]


def check_model(model) -> None:
    """A LLaMA-family layout: input / post-attention RMSNorm feeding q/k/v and gate/up, o/down writing back."""
    inner = model.model
    names = ("input_layernorm", "post_attention_layernorm")
    for layer in inner.layers:
        parts = [getattr(layer, n, None) for n in names]
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        projections = [getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                      [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if any(p is None for p in parts) or not all(isinstance(p, torch.nn.Linear) for p in projections):
            raise RecipeError(f"{type(layer).__name__} is not a LLaMA-style layer (input_layernorm, "
                              "post_attention_layernorm, q/k/v/o_proj, gate/up/down_proj): its hidden width cannot be "
                              "pruned", fix="drop hidden from --targets")
    if not hasattr(inner, "norm") or not hasattr(inner, "embed_tokens"):
        raise RecipeError("the model has no final norm or embedding where a LLaMA has them",
                          fix="drop hidden from --targets")


def _check_rms_norm(norm, h: torch.Tensor, out: torch.Tensor, name: str) -> None:
    """The norm must be y = w * h / sqrt(mean h^2 + eps) over the last axis, so that its weight slices and scales."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    w = getattr(norm, "weight", None)
    ok = eps is not None and w is not None and w.dim() == 1
    if ok:
        h32 = h.float()
        expect = w.float() * h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
        ok = bool((expect - out.float()).abs().max() <= NORM_CHECK_TOL * expect.abs().max().clamp_min(1e-30))
    if not ok:
        raise RecipeError(f"{name} ({type(norm).__name__}) is not an RMSNorm of the form w * h / rms(h): its weight "
                          "cannot follow a narrower hidden width", fix="drop hidden from --targets")


def _tokens(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).to(F64)


def _col_norms(linears) -> torch.Tensor:
    return sum(lin.weight.detach().to(F64).norm(dim=0).cpu() for lin in linears)


@torch.no_grad()
def hidden_scores(model, batches: list[torch.Tensor], score: str, device, home, progress: bool = False):
    """Per residual channel: the sum over the 2L + 1 norms of their normalised scores (module docstring)."""
    from grailc.llm.layerwise import DecoderBlock, decoder_parts, on_device

    layers, rotary = decoder_parts(model)
    sums: dict[str, torch.Tensor] = {}  # per norm: sum over tokens of x_c^2 (output) or h_c^2 (input)
    heads: dict[str, torch.Tensor] = {}

    def record(key, norm, checked):
        def hook(module, args, out):
            h = args[0]
            if not checked:
                _check_rms_norm(module, h, out, key)
                checked.append(True)
            v = out if score == "wanda" else h
            sums[key] = sums.get(key, 0) + _tokens(v).pow(2).sum(0).cpu()
        return norm.register_forward_hook(hook)

    for i in tqdm(range(len(layers)), desc="hidden scores", unit="layer", disable=not progress, leave=False):
        layer = layers[i]
        with on_device(layer, device, home):
            handles = [record(f"{i}.{n}", getattr(layer, n), []) for n in _consumers(layer)]
            try:
                block = DecoderBlock(layer, rotary)
                batches = [block(x) for x in batches]
            finally:
                for h in handles:
                    h.remove()
            for n, lins in _consumers(layer).items():
                heads[f"{i}.{n}"] = _col_norms(lins)
    norm = model.model.norm
    with on_device(norm, device, home):
        for x in batches:
            out = norm(x)
            if "final" not in sums:
                _check_rms_norm(norm, x, out, "model.norm")
            v = out if score == "wanda" else x
            sums["final"] = sums.get("final", 0) + _tokens(v).pow(2).sum(0).cpu()
    heads["final"] = _col_norms([model.lm_head])
    sums = all_reduce_stats(sums)
    total = torch.zeros(model.model.embed_tokens.weight.shape[1], dtype=F64)
    for key, ss in sums.items():
        s = ss.sqrt() * (heads[key] if score == "wanda" else 1.0)
        total += s / s.sum().clamp_min(1e-300)
    return total


def kept_width(d: int, ratio: float, multiple_of: int | str, heads: int = 1) -> int:
    """(1 - ratio) d, rounded to a multiple of ``multiple_of`` and of the query head count: a Hugging Face config
    requires hidden_size to be a multiple of num_attention_heads (even where head_dim is given). ``"auto"`` is the
    head count alone: with 8 it would be a step of 72 on SmolLM2 (9 heads), and a decoder's matmuls realise their
    MACs at exact widths (README, Speed)."""
    from grailc.passes.select import n_keep

    multiple = 1 if multiple_of == "auto" else multiple_of
    return n_keep(d, ratio, math.lcm(max(1, multiple), max(1, heads)))


class _NormFit:
    """Statistics of one norm over the calibration tokens: x the dense output (d), z the narrowed one (k, weight
    w_K, before its scale a): sum x x^T, sum x z^T, sum z z^T and the sums."""

    def __init__(self, keep: torch.Tensor, sequential: bool):
        self.keep, self.sequential = keep, sequential
        self.stats: dict = {"rows": 0}

    def add(self, x: torch.Tensor, z: torch.Tensor) -> None:
        """One batch: x the dense norm output, z the narrowed one."""
        x, z = _tokens(x), _tokens(z)
        pairs = {"Gx": x.T @ x, "C": x.T @ z, "Gz": z.T @ z, "sx": x.sum(0), "sz": z.sum(0)}
        for key, value in pairs.items():
            self.stats[key] = self.stats.get(key, 0) + value.cpu()
        self.stats["rows"] += x.shape[0]

    def scale(self, st: dict, H: torch.Tensor, correction: str) -> float:
        """The norm's scale a: least squares of the consumers' outputs, min_a sum ||W x - a W[:, K] z||^2, i.e.
        a = <H[:, K], C> / <H[K, K], Gz> with H = W^T W ("fit"), or of the norm's own output,
        a = <x_K, z> / <z, z> ("channel"); 1 ("off")."""
        K = self.keep.cpu()
        if correction == "fit":
            num, den = (H[:, K] * st["C"]).sum(), (H[K[:, None], K] * st["Gz"]).sum()
        elif correction == "channel":
            num, den = torch.diagonal(st["C"][K]).sum(), torch.diagonal(st["Gz"]).sum()
        else:
            return 1.0
        return float(num / den) if float(den) > 0 and float(num) > 0 else 1.0

    def solve(self, linears, compensate: str, lam: float, correction: str) -> dict:
        """The norm's scale a and the consumers' map (B, c) in the project's compensator convention, with the
        reconstruction errors plain and compensated of the consumers' outputs. Sequential: the narrowed model sees
        a z; one-shot: the Grams of the dense x alone (z = x_K)."""
        from grailc.channel_map import ChannelMap
        from grailc.context import SlotStats
        from grailc.passes.compensate import recon_error
        from grailc.registry import COMPENSATORS, load_builtin

        st = all_reduce_stats(dict(self.stats))
        m = torch.cat([lin.weight.detach().to(F64).cpu() for lin in linears])
        H = m.T @ m
        a = self.scale(st, H, correction)
        d, K = st["Gx"].shape[0], self.keep.cpu()
        Gz, C = torch.zeros(d, d, dtype=F64), torch.zeros(d, d, dtype=F64)
        sz = torch.zeros(d, dtype=F64)
        if self.sequential:
            Gz[K[:, None], K], C[:, K], sz[K] = a * a * st["Gz"], a * st["C"], a * st["sz"]
        else:
            Gz[K[:, None], K], C[:, K], sz[K] = st["Gx"][K[:, None], K], st["Gx"][:, K], st["sx"][K]
        biased = all(lin.bias is not None for lin in linears)
        stats = SlotStats(Gz, C, st["Gx"], sz if biased else None, st["sx"] if biased else None, int(st["rows"]))
        cmap = ChannelMap.select(K, d)
        out = {"scale": a, "recon_error_plain": recon_error(stats, H, None, cmap), "recon_error_grail": None,
               "compensation_refused": False, "B": None, "c": None}
        load_builtin()
        B, c, fallback = COMPENSATORS[compensate](stats, cmap, lam)
        if B is not None or c is not None:
            err = recon_error(stats, H, B, cmap, c)
            finite = all(t is None or bool(torch.isfinite(t).all()) for t in (B, c))
            out["recon_error_grail"] = err
            if err > out["recon_error_plain"] * (1 + 1e-9) + 1e-12 or not finite:
                out["compensation_refused"] = True
            else:
                out.update(B=B, c=c, fallback=fallback)
        return out


def _append_output(found: list):
    def hook(module, args, out):
        found.append(out.detach())
    return hook


def _stop_with_output(module, args, out):
    from grailc.llm.layerwise import _Captured

    raise _Captured(out.detach())


def _narrow_norm(norm, keep: torch.Tensor, scale: float = 1.0) -> None:
    replace_parameter(norm, "weight", norm.weight.detach()[keep.to(norm.weight.device)] * scale)


def _narrow_writer(lin: torch.nn.Linear, keep: torch.Tensor) -> None:
    idx = keep.to(lin.weight.device)
    replace_parameter(lin, "weight", lin.weight.detach()[idx])
    if lin.bias is not None:
        replace_parameter(lin, "bias", lin.bias.detach()[idx])


def _narrow_reader(lin: torch.nn.Linear, keep: torch.Tensor, fit: dict) -> None:
    """W' = W B (W[:, K] without a map); b' = b + W c with an offset."""
    W = lin.weight.detach()
    if fit["c"] is not None and lin.bias is not None:
        replace_parameter(lin, "bias", lin.bias.detach() + (W.to(F64) @ fit["c"].to(W.device)).to(W.dtype))
    new = W[:, keep.to(W.device)] if fit["B"] is None else (W.to(F64) @ fit["B"].to(W.device)).to(W.dtype)
    replace_parameter(lin, "weight", new)


def _record(name: str, fit: dict) -> dict:
    return {"norm": name, "scale": round(fit["scale"], 6),
            **{k: fit[k] for k in ("recon_error_plain", "recon_error_grail", "compensation_refused")}}


@torch.no_grad()
def prune_hidden(model, batches: list[torch.Tensor], recipe, *, device=None, home=None, progress: bool = False,
                 score: str = "residual", correction: str = "off", untie: bool = False):
    """Narrow the residual width of ``model`` in place to (1 - ratio) d channels (multiple of ``multiple_of``);
    ``batches`` are the hidden states entering layer 0 (on ``device``). Returns (report, the narrowed batches)."""
    from grailc.llm.layerwise import DecoderBlock, _Captured, decoder_parts, on_device

    if score not in SCORES:
        raise RecipeError(f"unknown hidden score {score!r}", fix=f"use one of {', '.join(SCORES)}")
    if correction not in NORM_CORRECTIONS:
        raise RecipeError(f"unknown norm correction {correction!r}", fix=f"use one of {', '.join(NORM_CORRECTIONS)}")
    check_model(model)
    recipe = recipe.resolved(llm=True)
    layers, rotary = decoder_parts(model)
    home = home or next(model.parameters()).device
    device = device or home
    d = model.model.embed_tokens.weight.shape[1]
    k = kept_width(d, recipe.ratio, recipe.multiple_of, getattr(model.config, "num_attention_heads", 1))
    scores = hidden_scores(model, batches, score, device, home, progress)
    if recipe.selector == "random":
        scores = torch.rand(d, generator=torch.Generator().manual_seed(recipe.calib.seed), dtype=F64)
    from grailc.passes.select import top_k

    keep = top_k(scores, k)
    report = {"size": d, "kept": k, "approximate": APPROXIMATE, "score": score, "norm_correction": correction,
              "compensate": recipe.compensate, "norms": []}
    if k == d:
        return report, batches
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    kd = keep.to(device)
    dense = batches
    narrow = [x[..., kd] for x in batches]
    for i in tqdm(range(len(layers)), desc="hidden", unit="layer", disable=not progress, leave=False):
        layer = layers[i]
        with on_device(layer, device, home):
            block = DecoderBlock(layer, rotary)
            names = list(_consumers(layer))
            captured: dict[str, list] = {n: [] for n in names}
            hooks = [getattr(layer, n).register_forward_hook(_append_output(captured[n])) for n in names]
            try:
                dense_next = [block(x) for x in dense]
            finally:
                for h in hooks:
                    h.remove()
            _narrow_norm(layer.input_layernorm, keep)
            first = _NormFit(kd, recipe.sequential)
            for x, z in zip(captured["input_layernorm"], narrow):
                first.add(x, layer.input_layernorm(z))
            fit = first.solve(_consumers(layer)["input_layernorm"], recipe.compensate, recipe.lam, correction)
            report["norms"].append(_record(f"{i}.input_layernorm", fit))
            layer.input_layernorm.weight.mul_(fit["scale"])
            for lin in _consumers(layer)["input_layernorm"]:
                _narrow_reader(lin, kd, fit)
            for lin in _writers(layer):
                _narrow_writer(lin, kd)
            post = layer.post_attention_layernorm
            _narrow_norm(post, keep)
            second = _NormFit(kd, recipe.sequential)
            grab = post.register_forward_hook(_stop_with_output)
            try:
                for x, z in zip(captured["post_attention_layernorm"], narrow):
                    try:
                        block(z)
                    except _Captured as stop:
                        second.add(x, stop.args[0])
            finally:
                grab.remove()
            fit = second.solve(_consumers(layer)["post_attention_layernorm"], recipe.compensate, recipe.lam,
                               correction)
            report["norms"].append(_record(f"{i}.post_attention_layernorm", fit))
            post.weight.mul_(fit["scale"])
            for lin in _consumers(layer)["post_attention_layernorm"]:
                _narrow_reader(lin, kd, fit)
            narrow = [block(z) for z in narrow] if recipe.sequential else [x[..., kd] for x in dense_next]
            dense = dense_next
    norm = model.model.norm
    with on_device(norm, device, home):
        last = [norm(x) for x in dense]
        _narrow_norm(norm, keep)
        final = _NormFit(kd, recipe.sequential)
        for x, z in zip(last, narrow):
            final.add(x, norm(z))
    compensate_head = untie or not tied
    fit = final.solve([model.lm_head], recipe.compensate if compensate_head else "none", recipe.lam, correction)
    report["norms"].append(_record("norm", fit))
    norm.weight.mul_(fit["scale"])
    head = model.lm_head.weight.detach()  # d wide: the embedding itself when tied
    embed = model.model.embed_tokens
    replace_parameter(embed, "weight", embed.weight.detach()[:, keep.to(embed.weight.device)])
    if tied and not untie:
        model.lm_head.weight = embed.weight
        model.lm_head.in_features = embed.weight.shape[1]
        report["lm_head"] = "tied to the embedding: sliced"
    else:
        model.lm_head.weight = torch.nn.Parameter(head.clone(), requires_grad=False)
        _narrow_reader(model.lm_head, kd, fit)
        model.config.tie_word_embeddings = False
        report["lm_head"] = "untied from the embedding and compensated" if tied else "compensated"
    model.config.hidden_size = k
    return report, narrow


def without_hidden(recipe):
    """The recipe for the layer-by-layer pass that follows: its targets less ``hidden`` / ``embed``."""
    import dataclasses

    from grailc.recipe import TARGETS

    return dataclasses.replace(recipe, targets=[t for t in recipe.targets if TARGETS[t] != "embed"])

