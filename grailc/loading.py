"""Loading a model to compress, without running untrusted code.

Accepted forms of ``spec``:

* ``model.pt2``: a ``torch.export`` archive; ``torch.export.load`` unpickles some members with
  ``weights_only=False`` (sample inputs, legacy or pickled weights, opaque constants), so without
  ``trust_pickle`` every unpickling it does is forced to ``weights_only=True`` and raw pickles are refused;
* ``torchvision:NAME`` or ``timm:NAME``: the architecture, built with random weights, plus ``weights=FILE``
  (``.safetensors``, or a ``torch.save``'d state dict loaded with ``weights_only=True``);
* any other path: a full ``torch.save(model)`` pickle, which is only unpickled when ``trust_pickle`` is set,
  because unpickling an ``nn.Module`` can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from grailc.errors import GrailcError, RecipeError, UntrustedFileError, did_you_mean

SAFE_FORMATS_HINT = (
    "use a safe format instead: a torch.export archive (.pt2), or a state dict with "
    "'torchvision:NAME --weights FILE' / 'timm:NAME --weights FILE'"
)
STATE_DICT_KEYS = ("state_dict", "model")
FORCE_LOAD_ENV = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
_MISMATCH_SHOWN = 3


@dataclass
class LoadedModel:
    """A loaded model: exactly one of ``module`` (in eval mode) and ``exported`` is set."""

    module: torch.nn.Module | None
    exported: torch.export.ExportedProgram | None
    source: str


def file_sha256(path) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        raise GrailcError(f"cannot read file to hash it ({e.strerror})", where=str(path)) from e
    return digest.hexdigest()


def load_model(spec: str, *, weights: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load ``spec`` (see the module docstring) and return it in eval mode."""
    spec = str(spec)
    for prefix, builder in (("torchvision:", _build_torchvision), ("timm:", _build_timm)):
        if spec.startswith(prefix):
            module = builder(spec[len(prefix) :])
            source = spec
            if weights is not None:
                _load_weights_into(module, str(weights))
                source += f" + weights {weights}"
            else:
                source += " (random weights)"
            return LoadedModel(module=module.eval(), exported=None, source=source)

    if weights is not None:
        raise RecipeError(
            "--weights only applies to 'torchvision:NAME' or 'timm:NAME' models",
            where=spec,
            fix="drop --weights, or name the architecture as 'torchvision:NAME' / 'timm:NAME'",
        )
    path = Path(spec)
    _check_readable_file(path)
    if path.suffix.lower() == ".pt2":
        exported = _load_exported(path, trust_pickle=trust_pickle)
        return LoadedModel(module=None, exported=exported, source=f"torch.export: {path}")
    module = _load_pickled_module(path, trust_pickle=trust_pickle)
    return LoadedModel(module=module.eval(), exported=None, source=f"pickled module: {path}")


def _check_readable_file(path: Path, what: str = "model file", missing_fix: str | None = None) -> None:
    where = str(path)
    if not path.exists():
        fix = missing_fix or "check the path, or name an architecture as 'torchvision:NAME' / 'timm:NAME'"
        raise GrailcError(f"{what} not found", where=where, fix=fix)
    if path.is_dir():
        raise GrailcError(f"expected a {what} but got a folder", where=where, fix="pass the file itself")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as e:
        raise GrailcError(f"cannot read {what} ({e.strerror})", where=where, fix="check permissions") from e
    if size == 0:
        raise GrailcError(f"{what} is empty", where=where, fix="re-save it; the file was never written")


def _build_torchvision(name: str) -> torch.nn.Module:
    import torchvision

    choices = torchvision.models.list_models()
    if name not in choices:
        raise RecipeError(
            f"unknown torchvision model {name!r}{did_you_mean(name, choices)}",
            fix="see torchvision.models.list_models() for the names",
        )
    try:
        return torchvision.models.get_model(name, weights=None)
    except Exception as e:
        raise GrailcError(f"could not build torchvision model {name!r}: {_short(e)}") from e


def _build_timm(name: str) -> torch.nn.Module:
    import timm

    if not name or not timm.is_model(name):
        raise RecipeError(
            f"unknown timm model {name!r}{did_you_mean(name, timm.list_models())}",
            fix="see timm.list_models() for the names",
        )
    try:
        return timm.create_model(name, pretrained=False)
    except Exception as e:
        raise GrailcError(f"could not build timm model {name!r}: {_short(e)}") from e


def _load_weights_into(module: torch.nn.Module, weights: str) -> None:
    path = Path(weights)
    _check_readable_file(path, "weights file", missing_fix="check the --weights path")

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:
            raise GrailcError(
                f"cannot read safetensors file, it is corrupt or truncated ({_short(e)})",
                where=weights,
                fix="re-save it with safetensors.torch.save_file",
            ) from e
    else:
        state = _extract_state_dict(_torch_load_weights_only(path, what="weights file"), weights)

    state = _strip_common_prefix(state, module)
    problems = _state_dict_mismatch(module, state)
    if problems:
        raise GrailcError(
            f"weights do not match the architecture: {problems}",
            where=weights,
            fix="check that the weights were saved from this exact architecture (same NAME and num_classes)",
        )
    try:
        module.load_state_dict(state, strict=True)
    except Exception as e:
        raise GrailcError(f"weights do not match the architecture: {_short(e)}", where=weights) from e


def _extract_state_dict(loaded, where: str) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise GrailcError(
            f"weights file holds a {type(loaded).__name__}, not a state dict",
            where=where,
            fix="save it with torch.save(model.state_dict(), FILE) or safetensors.torch.save_file",
        )
    not_tensors = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise GrailcError(
            f"weights file is not a state dict: {', '.join(not_tensors[:_MISMATCH_SHOWN])} are not tensors",
            where=where,
            fix="save it with torch.save(model.state_dict(), FILE)",
        )
    return dict(loaded)


def _strip_common_prefix(state: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` prefix that DataParallel/DDP adds, when every key has it and the model has none."""
    prefix = "module."
    expected = module.state_dict().keys()
    if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _state_dict_mismatch(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    groups = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong_shape))
    for label, items in groups:
        if items:
            more = f" and {len(items) - _MISMATCH_SHOWN} more" if len(items) > _MISMATCH_SHOWN else ""
            parts.append(f"{label} {', '.join(items[:_MISMATCH_SHOWN])}{more}")
    return "; ".join(parts)


@contextlib.contextmanager
def _quiet_torch_export_logs():
    """``torch.export.load`` logs a traceback before raising on a bad archive; keep it off the console."""
    names = ("torch.export", "torch._export")
    loggers = [logging.getLogger(name) for name in names]
    old_levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, old_levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _no_code_runs_on_load(path: Path, what: str):
    """While a .pt2 loads: every ``torch.load`` is weights-only and raw pickles are refused.

    ``torch.export.load`` unpickles sample inputs, legacy or pickled weights and opaque constants, some with
    ``weights_only=False``: a crafted archive would run code on load. Single-threaded use only (it patches
    ``torch.load``, ``pickle.loads`` and ``torch._C._pickle_load_obj`` for the duration, and sets torch's
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` for any ``torch.serialization.load`` reached another way).
    """
    real_torch_load, real_loads = torch.load, pickle.loads
    real_load_obj = getattr(torch._C, "_pickle_load_obj", None)
    saved_env = {name: os.environ.pop(name, None) for name in FORCE_LOAD_ENV}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"

    def weights_only_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            return real_torch_load(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            blocked = _blocked_global(e)
            if blocked is None:
                raise
            raise _untrusted_error(path, what, blocked) from e

    def refuse(*args, **kwargs):
        raise _untrusted_error(path, what, "a pickled constant")

    torch.load, pickle.loads = weights_only_load, refuse
    if real_load_obj is not None:
        torch._C._pickle_load_obj = refuse
    try:
        yield
    finally:
        torch.load, pickle.loads = real_torch_load, real_loads
        if real_load_obj is not None:
            torch._C._pickle_load_obj = real_load_obj
        for name, value in saved_env.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _load_exported(path: Path, *, trust_pickle: bool = False):
    guard = contextlib.nullcontext() if trust_pickle else _no_code_runs_on_load(path, "torch.export archive")
    try:
        with _quiet_torch_export_logs(), guard:
            return torch.export.load(str(path))
    except UntrustedFileError:
        raise
    except Exception as e:
        untrusted = _untrusted_cause(e)
        if untrusted is not None:
            raise untrusted from e
        raise GrailcError(
            f"cannot load torch.export archive, it is corrupt, truncated or not a .pt2 file ({_short(e)})",
            where=str(path),
            fix="re-create it with torch.export.save(torch.export.export(model, args), FILE)",
        ) from e


def _untrusted_cause(error: BaseException) -> UntrustedFileError | None:
    """An UntrustedFileError that torch wrapped into its own exception on the way out, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UntrustedFileError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _untrusted_error(path: Path, what: str, blocked: str) -> UntrustedFileError:
    return UntrustedFileError(
        f"{what} holds a pickled Python object ({blocked}); unpickling it can run arbitrary code, "
        "so it was not loaded",
        where=str(path),
        fix="pass --trust-pickle to unpickle it anyway (that runs any code the file holds: only for files you "
        f"trust), or {SAFE_FORMATS_HINT}",
    )


def _torch_load_weights_only(path: Path, *, what: str):
    """``torch.load(weights_only=True)`` with every failure turned into one clear line."""
    _refuse_torchscript(path, what)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = _blocked_global(e)
        if blocked is None:
            raise _corrupt_file_error(path, what, e) from e
        raise _untrusted_error(path, what, blocked) from e
    except Exception as e:
        raise _corrupt_file_error(path, what, e) from e


def _blocked_global(error: Exception) -> str | None:
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    return match.group(1) if match else None


def _corrupt_file_error(path: Path, what: str, error: Exception) -> GrailcError:
    return GrailcError(
        f"cannot read {what}, it is corrupt, truncated or not a torch.save file ({_short(error)})",
        where=str(path),
        fix="re-save it with torch.save, or check that the copy is complete",
    )


def _is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _refuse_torchscript(path: Path, what: str) -> None:
    if _is_torchscript_archive(path):
        raise GrailcError(
            f"{what} is a TorchScript archive, which grailc does not read",
            where=str(path),
            fix=SAFE_FORMATS_HINT,
        )


def _load_pickled_module(path: Path, *, trust_pickle: bool) -> torch.nn.Module:
    if not trust_pickle:
        raise _not_a_model_error(path, _torch_load_weights_only(path, what="model file"))

    _refuse_torchscript(path, "model file")
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as e:
        raise GrailcError(
            f"the pickled model refers to code that cannot be imported here ({_short(e)})",
            where=str(path),
            fix=f"run grailc where the model's Python module is importable, or {SAFE_FORMATS_HINT}",
        ) from e
    except Exception as e:
        raise _corrupt_file_error(path, "model file", e) from e

    if isinstance(loaded, torch.nn.Module) and not isinstance(loaded, torch.jit.ScriptModule):
        return loaded
    raise _not_a_model_error(path, loaded)


def _not_a_model_error(path: Path, loaded) -> GrailcError:
    """What a file that unpickled to something other than a module holds, and what to do instead."""
    if _looks_like_state_dict(loaded):
        return _state_dict_only_error(path)
    return GrailcError(
        f"model file holds a {type(loaded).__name__}, not a torch.nn.Module",
        where=str(path),
        fix=f"save the model with torch.save(model, FILE), or {SAFE_FORMATS_HINT}",
    )


def _looks_like_state_dict(loaded) -> bool:
    if not isinstance(loaded, Mapping):
        return False
    for key in STATE_DICT_KEYS:
        if isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    return bool(loaded) and any(isinstance(v, torch.Tensor) for v in loaded.values())


def _state_dict_only_error(path: Path) -> GrailcError:
    return GrailcError(
        "model file holds a state dict (weights only), which has no architecture",
        where=str(path),
        fix=f"pass the architecture and the file as 'torchvision:NAME --weights {path}' "
        f"(or 'timm:NAME --weights {path}'), or export the model to a .pt2 with torch.export",
    )


def _short(error: BaseException, limit: int = 120) -> str:
    """The gist of an exception message, on one short line, for embedding in a one-line error."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = re.split(r"(?<=\.) ", text, maxsplit=1)[0].rstrip(".")
    if isinstance(error, (KeyError, IndexError, ValueError, TypeError, EOFError)) or not text:
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["LoadedModel", "file_sha256", "load_model"]
