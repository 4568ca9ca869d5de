"""Decoder LLMs compressed with their weights streamed from disk (``grailc compress hf:PATH --stream``).

The model is built without weights (on the meta device) and only the parts every layer needs are read from the
safetensors files: the embedding, the final norm, the head (tied or not) and the rotary embedding (computed from the
config). Each decoder layer's tensors are read from its shard only when its turn comes (``resident``), then
compressed and run as without streaming; on leaving its turn the layer's tensors, narrowed or not, are written to
the output folder as one shard and the layer goes back to the meta device. CPU memory then holds one layer, the
embedding and head and the calibration activations, instead of the whole model. ``save`` writes the shard of the
remaining tensors, ``model.safetensors.index.json`` and the config, tokenizer and shapes file that
:func:`grailc.llm.hf.save_causal_lm` writes without streaming, so the output folder is the same.

Streaming reads safetensors only (a folder of ``.bin`` pickles is refused: reading one tensor of a pickle loads the
whole file, and unpickling runs code). The model's dtype is the one ``load_causal_lm`` gives: the config's dtype,
else the checkpoint's.
"""

from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path

import torch

from grailc.errors import GrailcError, RecipeError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ONNX_SKIPPED = ("not exported: --stream never holds the whole model, which the ONNX export needs; pass --no-onnx "
                "with --stream, then run `grailc export OUT/` on a machine that can hold the compressed model")


def check_streamable(recipe) -> None:
    """Refuse what needs the whole model at once: pruning the hidden width cuts every layer and the embedding."""
    from grailc.recipe import TARGETS

    if "embed" in {TARGETS.get(t, t) for t in recipe.targets}:
        raise RecipeError("--stream holds one decoder layer at a time, and pruning the hidden width (--targets "
                          "hidden) needs the whole model", fix="drop --stream, or prune --targets mlp,heads")


class SafetensorsFiles:
    """The tensors of a Hugging Face folder's safetensors files: which file holds each name, and reading by name.
    A sharded folder is described by ``model.safetensors.index.json``; otherwise every ``*.safetensors`` file is
    listed (usually the one ``model.safetensors``)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {name: folder / file for name, file in weight_map.items()}
            return
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
            raise RecipeError(
                f"--stream reads weights from safetensors files, and {folder} has none"
                + (f" ({', '.join(others[:3])})" if others else ""),
                fix="convert the folder once (AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst) writes "
                    "safetensors), or drop --stream")
        self.file_of = {}
        for file in files:
            with safe_open(file, "pt") as f:
                self.file_of.update({name: file for name in f.keys()})

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def read(self, names) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once and closed after (no mapping of a shard outlives the read)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(file, "pt") as f:
                tensors.update({name: f.get_tensor(name) for name in file_names})
        return tensors

    def first_float_dtype(self) -> torch.dtype | None:
        for name in self.file_of:
            (tensor,) = self.read([name]).values()
            if tensor.is_floating_point():
                return tensor.dtype
        return None


class StreamedModel:
    """A causal LM whose decoder layers are on the meta device except while their turn lasts (:meth:`resident`).
    ``out`` None (a data-parallel process other than rank 0): layers are read and freed, nothing is written."""

    def __init__(self, folder, out: Path | None):
        from grailc.llm.hf import quiet_transformers

        self.folder, self.out = Path(folder), out
        if not (self.folder / "config.json").is_file():
            raise GrailcError(f"{self.folder} is not a Hugging Face model folder (no config.json)",
                              fix="give hf:PATH with a folder saved by save_pretrained")
        self.files = SafetensorsFiles(self.folder)
        with quiet_transformers():
            self.model, self.tokenizer = self._empty_model()
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.shards_written = 0

    def _empty_model(self):
        """The model without weights, parameters reshaped where ``grailc_shapes.json`` says so, the parts outside
        the decoder layers read from disk, the head tied when the config ties it."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from grailc.llm.hf import SHAPES_FILE, reshape_parameters
        from grailc.llm.layerwise import decoder_parts

        tokenizer = AutoTokenizer.from_pretrained(self.folder, trust_remote_code=False)
        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=False)
        dtype = getattr(config, "dtype", None) or self.files.first_float_dtype() or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
        shapes_file = self.folder / SHAPES_FILE
        if shapes_file.exists():
            reshape_parameters(model, {k: tuple(v) for k, v in json.loads(shapes_file.read_text()).items()})
        layers, _ = decoder_parts(model)
        names = {id(m): n for n, m in model.named_modules()}
        self.layer_prefix = [f"{names[id(layer)]}." for layer in layers]
        self.layers = layers
        inside = names[id(layers)] + "."
        rest = [k for k in model.state_dict() if not k.startswith(inside)]
        tied = bool(getattr(config, "tie_word_embeddings", False))
        missing = [k for k in rest if k not in self.files and not (tied and k.endswith("lm_head.weight"))]
        if missing:
            raise GrailcError(f"the weights in {self.folder} do not fit the model: missing {missing[:3]}")
        self.rest = [k for k in rest if k in self.files and not (tied and k.endswith("lm_head.weight"))]
        self._assign(model, self.files.read(self.rest))
        if tied:
            model.tie_weights()
        model.config.use_cache = False
        return model.eval(), tokenizer

    def _assign(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Give ``module`` these tensors (names relative to it) in the model's dtype, replacing meta tensors."""
        state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        result = module.load_state_dict(state, strict=False, assign=True)
        if result.unexpected_keys:
            raise GrailcError(f"unexpected tensors {result.unexpected_keys[:3]} in {self.folder}")

    @contextlib.contextmanager
    def resident(self, index: int, write: bool):
        """Decoder layer ``index`` with its weights in CPU memory inside the block; on leaving, its tensors are
        written to the output as one shard (``write``, and an output folder) and it goes back to the meta device."""
        layer, prefix = self.layers[index], self.layer_prefix[index]
        names = [prefix + k for k in layer.state_dict()]
        absent = [n for n in names if n not in self.files]
        if absent:
            raise GrailcError(f"the weights in {self.folder} do not fit the model: missing {absent[:3]}")
        self._assign(layer, {n[len(prefix):]: t for n, t in self.files.read(names).items()})
        try:
            yield layer
            if write and self.out is not None:
                self._write_shard(index + 1, {prefix + k: v for k, v in layer.state_dict().items()})
        finally:
            layer.to("meta")

    def _shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{len(self.layers) + 1:05d}.safetensors"

    def _write_shard(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        name = self._shard_name(number)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, self.out / name, metadata={"format": "pt"})
        self.weight_map.update({k: name for k in tensors})
        self.total_size += sum(v.numel() * v.element_size() for v in tensors.values())
        self.shards_written += 1

    def save(self) -> str:
        """After every layer was written: the shard of the other tensors, the index, then config, tokenizer and
        shapes file as :func:`grailc.llm.hf.save_causal_lm` writes them; returns its "config" or "shapes"."""
        from grailc.llm.hf import save_causal_lm
        from grailc.metrics import count_params

        unwritten = [i for i, prefix in enumerate(self.layer_prefix)
                     if not any(k.startswith(prefix) for k in self.weight_map)]
        if unwritten:
            raise GrailcError(f"decoder layers {unwritten[:3]} were never written (an internal error)")
        state = self.model.state_dict()
        self._write_shard(len(self.layers) + 1, {k: state[k] for k in self.rest})
        index = {"metadata": {"total_parameters": count_params(self.model), "total_size": self.total_size},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return save_causal_lm(self.model, self.tokenizer, self.out, weights_written=True)

    def record(self) -> dict:
        """What the report says about the streaming."""
        return {"source_files": len(set(self.files.file_of.values())), "shards_written": self.shards_written}


@contextlib.contextmanager
def resident(stream: StreamedModel | None, index: int, write: bool, traced: bool = True):
    """``stream.resident`` when streaming (else the whole model is in memory already); either way, where the layer
    was ``traced``, its traced graphs, which hold its tensors in reference cycles, are freed on leaving rather than
    piling up (a full collection: about 0.24 s with SmolLM2 loaded, so not for layers only run through)."""
    try:
        with stream.resident(index, write) if stream is not None else contextlib.nullcontext():
            yield
    finally:
        if traced:
            gc.collect()
