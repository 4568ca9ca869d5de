"""Hugging Face causal LMs: load from a local folder (``hf:PATH``), take narrowed weights back from a compressed
graph, and save a folder that loads again.

A compressed model whose layers all kept the same widths is saved as a plain Hugging Face folder: its config's
``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` are rewritten, so
``AutoModelForCausalLM.from_pretrained(out)`` loads it with no custom code. Layers with different widths (a global
budget spreads the cuts unevenly) cannot be described by a config: the original config is kept and
``grailc_shapes.json`` lists the shape of every parameter that differs from it. ``load_causal_lm`` builds the model
from the config, gives those parameters their stored shapes, and loads the safetensors weights strictly
(``trust_remote_code=False`` throughout; nothing is unpickled).

Compensation with an offset (``bias``, ``grail+bias``) gives ``down_proj`` / ``o_proj`` a bias that LLaMA-family
layers are built without. Where the config has a switch that builds that bias (LLaMA's ``mlp_bias``,
``attention_bias``: tried on a model built from a copy of the config on the meta device), the switch is turned on and
the other linears it gives a bias get zero ones, so the folder stays a plain one (:func:`switch_on_biases`,
:func:`complete_biases`); elsewhere (Mistral and Qwen2 have no switch; GLM's ``attention_bias`` builds the q, k and v
biases but never o_proj's) the added biases are listed in ``grailc_shapes.json`` like any other shape the config does
not build.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from grailc.errors import GrailcError
from grailc.surgery import owner_of, set_param

SHAPES_FILE = "grailc_shapes.json"
BIAS_SWITCHES = ("mlp_bias", "attention_bias")  # config switches that build some linears of a layer with biases
LAYER_PREFIX = "model.layers.{}."  # a decoder layer's parameter names in the model


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars from transformers while loading or saving (grailc prints its own)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_causal_lm(folder, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local folder, in eval mode, KV cache off."""
    with quiet_transformers():
        return _load_causal_lm(folder, dtype)


def _load_causal_lm(folder, dtype: torch.dtype | None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise GrailcError(f"{folder} is not a Hugging Face model folder (no config.json)",
                          fix="give hf:PATH with a folder saved by save_pretrained")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    shapes_file = folder / SHAPES_FILE
    if shapes_file.exists():
        from safetensors.torch import load_file

        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        reshape_parameters(model, {k: tuple(v) for k, v in json.loads(shapes_file.read_text()).items()})
        state = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(f))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not _tied(model, k)]
        if missing or unexpected:
            raise GrailcError(f"the weights in {folder} do not fit the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
        model.tie_weights()
        for layer in model.model.layers:
            follow_widths(layer, head_dim_of(config))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    if dtype is not None:
        model = model.to(dtype)
    model.config.use_cache = False
    return model.eval(), tokenizer


def _tied(model, key: str) -> bool:
    return key.endswith("lm_head.weight") and bool(getattr(model.config, "tie_word_embeddings", False))


def reshape_parameters(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Give the named parameters new (empty) tensors of the given shapes, and fix the owning modules' sizes; a
    linear's bias the config does not build is added."""
    for name, shape in shapes.items():
        current = _parameter_or_none(model, name)
        like = current if current is not None else _addable_bias(model, name)
        replace_parameter(model, name, torch.empty(shape, dtype=like.dtype, device=like.device))


def _parameter_or_none(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _addable_bias(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The weight beside ``name`` where ``name`` is the absent bias of a linear layer (the new bias takes its dtype
    and device), else a GrailcError: a parameter the model has no place for."""
    owner_name, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        owner = None
    if leaf != "bias" or not isinstance(owner, torch.nn.Linear) or owner.bias is not None:
        raise GrailcError(f"parameter {name} has no place in {type(model).__name__}: only a linear layer's bias "
                          "can be added to a Hugging Face model")
    return owner.weight


def adopt_weights(module: torch.nn.Module, compressed: torch.nn.Module) -> None:
    """Copy every parameter of ``compressed`` (a graph traced from ``module``, so its parameters carry the same
    names) into ``module``, taking the new shapes; a bias that compensation gave a linear layer built without one is
    added to it. A parameter with no place in ``module`` is an error, never dropped."""
    own = dict(module.named_parameters())
    for name, value in compressed.named_parameters():
        like = own[name] if name in own else _addable_bias(module, name)
        replace_parameter(module, name, value.to(like.dtype))


def built_biases(config) -> set[str]:
    """The names of the biases that a model built from ``config`` has."""
    return {name for name in config_shapes(config) if name.endswith(".bias")}


def switch_on_biases(model, linears: list[str]) -> list[str]:
    """Turn on the config's ``BIAS_SWITCHES`` that build a bias for ``linears`` (names inside a decoder layer, e.g.
    ``mlp.down_proj``) where it lacks one; returns the switches turned on. A linear no switch gives a bias keeps
    its added bias in ``grailc_shapes.json`` (:func:`save_causal_lm`)."""
    import copy

    config, turned = model.config, []
    first = LAYER_PREFIX.format(0)
    built = built_biases(config) if linears else set()  # a model build on the meta device: once, and per trial
    for linear in linears:
        if first + linear + ".bias" in built:
            continue
        for switch in BIAS_SWITCHES:
            if getattr(config, switch, None) is not False:  # absent, or already on
                continue
            trial = copy.deepcopy(config)
            setattr(trial, switch, True)
            with_switch = built_biases(trial)
            if first + linear + ".bias" in with_switch:
                setattr(config, switch, True)
                turned.append(switch)
                built = with_switch
                break
    return turned


def complete_biases(layer: torch.nn.Module, index: int, built: set[str]) -> None:
    """Zero biases for the linears of decoder layer ``index`` that a model built from the config has (``built``:
    :func:`built_biases`) and ``layer`` lacks (a switch turned on), so it has every parameter the config
    describes."""
    prefix = LAYER_PREFIX.format(index)
    for name, lin in layer.named_modules():
        if isinstance(lin, torch.nn.Linear) and lin.bias is None and f"{prefix}{name}.bias" in built:
            w = lin.weight
            lin.bias = torch.nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                          requires_grad=False)


def replace_parameter(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Set a parameter to ``value`` (any shape; a new one where the module has none of that name, such as a
    linear's absent bias) and keep its module's size attributes in step."""
    owner, leaf = owner_of(model, name)
    if leaf not in owner._buffers and owner._parameters.get(leaf) is None:
        owner.register_parameter(leaf, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
    else:
        set_param(model, name, value)
    if isinstance(owner, torch.nn.Linear):
        owner.out_features, owner.in_features = owner.weight.shape
    elif isinstance(owner, torch.nn.Embedding):
        owner.num_embeddings, owner.embedding_dim = owner.weight.shape


def layer_widths(layer, head_dim: int) -> dict[str, int]:
    """The widths of one LLaMA-family decoder layer (separate q, k, v projections, or one fused ``qkv_proj``
    holding the queries, then the keys, then the values)."""
    attn, mlp = layer.self_attn, layer.mlp
    query = attn.o_proj.in_features
    keys = (attn.k_proj.out_features if hasattr(attn, "k_proj")
            else (attn.qkv_proj.out_features - query) // 2)
    return {
        "intermediate_size": mlp.down_proj.in_features,
        "num_attention_heads": query // head_dim,
        "num_key_value_heads": keys // head_dim,
    }


def follow_widths(layer, head_dim: int) -> None:
    """Make a decoder layer's attention compute with the head counts of its (narrowed) weights: the counts some
    families keep as attributes (``num_key_value_heads``, ``num_key_value_groups``) or read from the config in
    ``forward`` (Phi-3 slices its fused ``qkv_proj`` at ``config.num_attention_heads``; the layer then gets its
    own copy of the config)."""
    import copy

    widths = layer_widths(layer, head_dim)
    heads, kv = widths["num_attention_heads"], widths["num_key_value_heads"]
    attn = layer.self_attn
    for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv),
                        ("num_key_value_groups", heads // max(kv, 1))):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)
    config = getattr(attn, "config", None)
    if config is not None and (config.num_attention_heads, config.num_key_value_heads) != (heads, kv):
        attn.config = copy.copy(config)
        attn.config.num_attention_heads, attn.config.num_key_value_heads = heads, kv


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def config_shapes(config) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of a model built from ``config`` (built on the meta device: no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(), quiet_transformers():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return {name: tuple(p.shape) for name, p in empty.named_parameters()}


def save_causal_lm(model, tokenizer, folder, weights_written: bool = False) -> str:
    """Write the model (safetensors), tokenizer and config into ``folder``; returns "config" when the widths are
    uniform (plain Hugging Face folder) or "shapes" when ``grailc_shapes.json`` was needed: the shape of every
    parameter that differs from what the (kept) config builds, so that a model compressed again keeps loading.
    ``weights_written``: the safetensors files are already there (streamed, :mod:`grailc.llm.stream`) and the
    model holds only their shapes, so only the config, generation config and tokenizer are written."""
    folder = Path(folder)
    config = model.config
    head_dim = head_dim_of(config)
    widths = [layer_widths(layer, head_dim) for layer in model.model.layers]
    hidden = model.model.embed_tokens.weight.shape[1]
    uniform = all(w == widths[0] for w in widths)
    if uniform:
        for key, value in widths[0].items():
            setattr(config, key, value)
        config.head_dim, config.hidden_size = head_dim, hidden
    with quiet_transformers():
        if weights_written:
            save_config(model, folder)
        else:
            model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    built = config_shapes(config)
    changed = {name: list(p.shape) for name, p in model.named_parameters() if tuple(p.shape) != built.get(name)}
    if changed:  # uneven widths, or biases the config has no switch for
        (folder / SHAPES_FILE).write_text(json.dumps(changed, indent=1))
    from grailc.outputs import default_file_mode

    for path in folder.iterdir():  # safetensors leaves its file 0600: every output gets the same mode
        if path.is_file():
            path.chmod(default_file_mode())
    return "shapes" if changed else "config"


def save_config(model, folder) -> None:
    """The config and generation config as ``save_pretrained`` writes them (dtype and architecture recorded)."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
