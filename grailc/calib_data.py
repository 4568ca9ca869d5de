"""Calibration inputs: an image folder, a tensor file, or seeded random data.

* ``"random"``: standard-normal noise from a seeded generator (data-free; not normalised).
* A folder: images found recursively (hidden files and folders, whose names start with ``.``, are skipped),
  in sorted path order, given the ImageNet eval transform: resize the shorter side to
  ``round(max(H, W) / 0.875)``, center crop to ``H x W``, scale to ``[0, 1]``, then normalise with
  ``mean``/``std`` (or the ImageNet constants when ``C == 3`` and none are given; with ``C != 3`` and none
  given, values stay in ``[0, 1]``).
* A ``.npy`` / ``.pt`` / ``.pth`` file holding one tensor ``[N, *input_shape[1:]]``: taken as already
  preprocessed, so floating data is only cast to float32, never normalised; integer data (token ids, masks) keeps
  its type. A ``.pt`` / ``.pth`` file may also hold a tuple, list or dict of tensors, one per model input (a
  dict keyed by the input names), all with the same ``N``.

A model with several inputs gets one input shape per input and batches that are tuples, one tensor per input;
only random data and tensor files can feed several inputs.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grailc.errors import CalibrationError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TENSOR_SUFFIXES = (".npy", ".pt", ".pth")
CROP_FRACTION = 0.875
ACCEPTED_FORMS = (
    "pass 'random', a folder of images (" + ", ".join(s.lstrip(".") for s in IMAGE_SUFFIXES) + "), "
    "or a .npy / .pt / .pth file holding one tensor [N, *input_shape[1:]] (a .pt / .pth file: or a tuple, list or "
    "dict of them, one per model input)"
)


@dataclass
class CalibrationData:
    """Calibration batches (each ``[b, *input_shape[1:]]``, the last possibly smaller; floating data as float32):
    tensors for a model with one input, tuples with one tensor per input for a model with several."""

    batches: list[torch.Tensor] | list[tuple[torch.Tensor, ...]]
    source: str
    data_free: bool


def load_calibration(
    source: str,
    input_shape: tuple[int, ...],
    *,
    num_batches: int,
    batch_size: int,
    mean=None,
    std=None,
    normalize: bool = True,
    seed: int = 0,
    names: list[str] | None = None,
) -> CalibrationData:
    """Up to ``num_batches * batch_size`` calibration samples from ``source`` (see the module docstring).

    ``input_shape`` is one shape, or a list of shapes for a model with several inputs, named by ``names`` (which
    also orders the tensors of a dict file)."""
    shapes = _check_sizes(input_shape, num_batches, batch_size)
    source = str(source)
    limit = num_batches * batch_size

    if source == "random":
        generator = torch.Generator().manual_seed(int(seed))
        batches = [
            tuple(torch.randn((batch_size, *shape[1:]), generator=generator, dtype=torch.float32) for shape in shapes)
            for _ in range(num_batches)
        ]
        return CalibrationData(batches=_per_model(batches), source="random (data-free)", data_free=True)

    path = Path(source)
    if not path.exists():
        raise CalibrationError("calibration source not found", where=source, fix=ACCEPTED_FORMS)
    if path.is_dir():
        if len(shapes) > 1:
            raise CalibrationError(
                f"an image folder gives one input, but the model takes {len(shapes)}", where=source,
                fix="pass a .pt file holding a tuple or dict of tensors, one per model input",
            )
        samples, description = _load_image_folder(path, shapes[0], limit, mean, std, normalize)
        inputs = [samples]
    elif path.suffix.lower() in TENSOR_SUFFIXES:
        inputs = _load_tensor_file(path, shapes, limit, names)
        description = f"tensor: {path} ({inputs[0].shape[0]} samples)"
    else:
        raise CalibrationError(
            f"unsupported calibration file type {path.suffix or '(no suffix)'!r}",
            where=source,
            fix=ACCEPTED_FORMS,
        )

    for i, samples in enumerate(inputs):
        what = f"calibration input {_label(names, i)}" if len(inputs) > 1 else "calibration data"
        check_finite(samples, f"{what} (as {str(samples.dtype).removeprefix('torch.')})", where=source)
    columns = [torch.split(samples, batch_size) for samples in inputs]
    batches = [tuple(chunk.contiguous() for chunk in chunks) for chunks in zip(*columns)]
    return CalibrationData(batches=_per_model(batches), source=description, data_free=False)


def _per_model(batches: list[tuple[torch.Tensor, ...]]) -> list:
    """Batches as :func:`grailc.compress` takes them: a tensor each for one input, a tuple each for several."""
    return [b[0] for b in batches] if batches and len(batches[0]) == 1 else batches


def _label(names: list[str] | None, i: int) -> str:
    return names[i] if names and i < len(names) else str(i)


def _check_sizes(input_shape, num_batches, batch_size) -> list[tuple[int, ...]]:
    for name, value in (("num_batches", num_batches), ("batch_size", batch_size)):
        if not _is_int(value) or value < 1:
            raise CalibrationError(
                f"{name} must be a positive integer, got {value!r}", fix=f"set {name} to 1 or more"
            )
    try:
        items = list(input_shape)
    except TypeError:
        items = []
    several = bool(items) and all(isinstance(s, (tuple, list)) for s in items)
    shapes = [tuple(s) for s in items] if several else [tuple(items)]
    if not all(shape and all(_is_int(d) and d > 0 for d in shape) for shape in shapes):
        raise CalibrationError(
            f"input shape must be positive integers like (1, 3, 224, 224), or a list of such shapes (one per model "
            f"input), got {input_shape!r}",
            fix="give the model's input shape, batch dimension first",
        )
    return [tuple(int(d) for d in shape) for shape in shapes]


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _normalisation(channels: int, mean, std, normalize: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not normalize:
        return None
    if mean is None and std is None:
        if channels != 3:
            return None
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if mean is None or std is None:
        raise CalibrationError(
            "give both mean and std for normalisation, or neither", fix="set both, one value per channel"
        )
    mean_t = _per_channel("mean", mean, channels)
    std_t = _per_channel("std", std, channels)
    if not bool((std_t > 0).all()):
        raise CalibrationError(
            f"std must be positive, got {list(std_t.flatten().tolist())}", fix="fix the std values"
        )
    return mean_t, std_t


def _per_channel(name: str, values, channels: int) -> torch.Tensor:
    try:
        flat = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError) as e:
        raise CalibrationError(
            f"{name} must be numbers, got {values!r}", fix=f"give {channels} numbers"
        ) from e
    if len(flat) == 1:
        flat = flat * channels
    if len(flat) != channels or not all(math.isfinite(v) for v in flat):
        raise CalibrationError(
            f"{name} needs {channels} finite value(s), one per channel, got {values!r}",
            fix=f"give {channels} numbers",
        )
    return torch.tensor(flat, dtype=torch.float32).view(channels, 1, 1)


def _find_images(folder: Path) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _load_image_folder(folder: Path, input_shape, limit: int, mean, std, normalize: bool):
    if len(input_shape) != 4:
        raise CalibrationError(
            f"an image folder needs a 4-d input (N, C, H, W), but the model input is {list(input_shape)}",
            where=str(folder),
            fix="pass a .npy or .pt tensor file of inputs instead",
        )
    _, channels, height, width = input_shape
    if channels not in (1, 3):
        raise CalibrationError(
            f"images give 1 (grayscale) or 3 (RGB) channels, but the model input has {channels}",
            where=str(folder),
            fix="pass a .npy or .pt tensor file of inputs instead",
        )
    stats = _normalisation(channels, mean, std, normalize)
    try:
        images = _find_images(folder)
    except OSError as e:
        raise CalibrationError(f"cannot list calibration folder ({e.strerror})", where=str(folder)) from e
    if not images:
        raise CalibrationError(
            "no image files found in calibration folder",
            where=str(folder),
            fix=f"put images ({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)}) in it, or pass 'random'",
        )
    chosen = images[:limit]
    samples = torch.stack([_load_image(p, channels, height, width) for p in chosen])
    if stats is not None:
        samples = (samples - stats[0]) / stats[1]
    count = f"{len(chosen)} files" if len(chosen) == len(images) else f"{len(chosen)} of {len(images)} files"
    return samples, f"images: {folder} ({count})"


def _load_image(path: Path, channels: int, height: int, width: int) -> torch.Tensor:
    from PIL import Image

    fix = "remove or replace this file"
    try:
        if path.stat().st_size == 0:
            raise CalibrationError("image file is empty (0 bytes)", where=str(path), fix=fix)
        with Image.open(path) as image:
            image.load()
            if image.width == 0 or image.height == 0:
                raise CalibrationError(
                    f"image has zero size ({image.width}x{image.height})", where=str(path), fix=fix
                )
            image = image.convert("RGB" if channels == 3 else "L")
            image = _resize_and_center_crop(image, height, width)
            pixels = np.asarray(image, dtype=np.float32) / 255.0
    except CalibrationError:
        raise
    except Image.UnidentifiedImageError as e:
        raise CalibrationError("not a readable image (unknown format)", where=str(path), fix=fix) from e
    except Exception as e:
        raise CalibrationError(f"cannot read image ({_first_line(e)})", where=str(path), fix=fix) from e
    if channels == 1:
        pixels = pixels[None, :, :]
    else:
        pixels = pixels.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(pixels))


def _resize_and_center_crop(image, height: int, width: int):
    from PIL import Image

    short_side = round(max(height, width) / CROP_FRACTION)
    w, h = image.size
    if w <= h:
        new_w, new_h = short_side, max(1, int(short_side * h / w))
    else:
        new_w, new_h = max(1, int(short_side * w / h)), short_side
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - height) / 2.0))
    left = int(round((new_w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def tensor_file_sample_shapes(path, names: list[str] | None = None) -> list[list[int]]:
    """The shape of one sample (all dims but the first) of each input a tensor file holds, without reading the
    data."""
    return [[int(d) for d in raw.shape[1:]] for raw in _tensors_in_file(Path(path), names)]


def _tensors_in_file(path: Path, names: list[str] | None) -> list:
    """The tensors of a tensor file, one per model input (a dict's in the order of ``names`` when its keys are
    those names); a count that differs from ``names`` is refused."""
    where, raw = str(path), _read_tensor_file(path)
    if isinstance(raw, dict):
        if names and set(map(str, raw)) == set(names):
            raw = [raw[name] for name in names]
        elif names and len(names) > 1:
            raise CalibrationError(
                f"calibration file holds a dict with keys ({', '.join(map(str, raw))}), but the model's inputs are "
                f"({', '.join(names)})",
                where=where, fix="key the tensors by the model's input names",
            )
    entries = list(raw.values()) if isinstance(raw, dict) else list(raw) if isinstance(raw, (tuple, list)) else [raw]
    if names and len(entries) != len(names):
        raise CalibrationError(
            f"calibration file holds {len(entries)} tensor(s), but the model takes {len(names)} input(s) "
            f"({', '.join(names)})",
            where=where, fix="save one tensor per model input, in order: torch.save((x, mask), FILE)",
        )
    return entries


def _read_tensor_file(path: Path):
    """A .npy (memory-mapped, no pickles) holding one array, or a .pt holding a tensor or a tuple, list or dict of
    tensors (weights-only loading); clear errors otherwise."""
    where = str(path)
    fix = "re-save the inputs with numpy.save or torch.save(tensor, FILE)"
    try:
        if path.suffix.lower() == ".npy":
            raw = np.load(path, mmap_mode="r", allow_pickle=False)
            if not isinstance(raw, np.ndarray) or not (
                np.issubdtype(raw.dtype, np.number) or raw.dtype == np.bool_
            ):
                raise CalibrationError(
                    f"calibration .npy holds {raw.dtype} data, not numbers", where=where, fix=fix
                )
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
            values = raw.values() if isinstance(raw, dict) else raw if isinstance(raw, (tuple, list)) else [raw]
            bad = next((v for v in values if not isinstance(v, torch.Tensor)), None) if values else raw
            if bad is not None:
                inside = "" if bad is raw else f" {type(raw).__name__} of"
                raise CalibrationError(
                    f"calibration file holds a{inside} {type(bad).__name__}, expected a tensor, or a tuple, list "
                    "or dict of tensors (one per model input)",
                    where=where,
                    fix="save the inputs with torch.save(tensor, FILE), or torch.save((x, mask), FILE)",
                )
    except CalibrationError:
        raise
    except pickle.UnpicklingError as e:
        raise CalibrationError(
            "calibration file holds pickled Python objects, not a plain tensor, so it was not loaded",
            where=where,
            fix="save a single tensor with torch.save(tensor, FILE) or numpy.save",
        ) from e
    except Exception as e:
        raise CalibrationError(
            f"cannot read calibration file, it is corrupt or not a plain tensor ({_first_line(e)})",
            where=where,
            fix=fix,
        ) from e

    return raw


def _load_tensor_file(path: Path, shapes, limit: int, names: list[str] | None = None) -> list[torch.Tensor]:
    """The first ``limit`` samples of each input a tensor file holds, shape-checked; a .npy is memory-mapped."""
    where = str(path)
    entries = _tensors_in_file(path, names)
    if len(entries) != len(shapes):
        raise CalibrationError(
            f"calibration file holds {len(entries)} tensor(s), but {len(shapes)} input shape(s) were given",
            where=where, fix="give one input shape per model input, in the order the file holds them",
        )
    inputs = [_load_input(raw, shape, limit, where, _label(names, i) if len(shapes) > 1 else None)
              for i, (raw, shape) in enumerate(zip(entries, shapes))]
    if len({int(raw.shape[0]) for raw in entries}) > 1:
        sizes = ", ".join(f"{_label(names, i)} {int(raw.shape[0])}" for i, raw in enumerate(entries))
        raise CalibrationError(
            f"calibration file holds different numbers of samples per input ({sizes})",
            where=where, fix="save the same number of samples N for every input",
        )
    return inputs


def _load_input(raw, input_shape, limit: int, where: str, name: str | None) -> torch.Tensor:
    """One input's first ``limit`` samples: floating data as float32, integer data (token ids, masks) as is."""
    fix = "re-save the inputs with numpy.save or torch.save(tensor, FILE)"
    what = f"calibration tensor for input {name}" if name else "calibration tensor"
    shape = tuple(raw.shape)
    expected = "[" + ", ".join(["N", *(str(d) for d in input_shape[1:])]) + "]"
    if len(shape) != len(input_shape) or shape[1:] != tuple(input_shape[1:]):
        raise CalibrationError(
            f"{what} has shape {list(shape)}, expected {expected} (input {list(input_shape)})",
            where=where,
            fix="save the inputs preprocessed, batch dimension first, in the model's layout",
        )
    if shape[0] == 0:
        raise CalibrationError(f"{what} holds no samples (N = 0)", where=where, fix=fix)
    is_complex = np.iscomplexobj(raw) if isinstance(raw, np.ndarray) else raw.is_complex()
    if is_complex:
        raise CalibrationError(f"{what} holds complex numbers", where=where, fix=fix)
    try:
        if isinstance(raw, np.ndarray):
            if not np.issubdtype(raw.dtype, np.floating):
                return torch.from_numpy(np.array(raw[:limit]))
            with np.errstate(over="ignore", invalid="ignore"):
                return torch.from_numpy(np.array(raw[:limit], dtype=np.float32))
        if not raw.is_floating_point():
            return raw[:limit].detach().contiguous()
        return raw[:limit].detach().to(torch.float32).contiguous()
    except Exception as e:
        raise CalibrationError(
            f"cannot read calibration file ({_first_line(e)})", where=where, fix=fix
        ) from e


def check_finite(samples: torch.Tensor, what: str, *, where: str | None = None,
                 fix: str = "clean or regenerate the inputs") -> None:
    """Refuse NaN/Inf in a batch of samples, saying how many and the first sample that holds one."""
    bad = ~torch.isfinite(samples)
    if bool(bad.any()):
        first_sample = int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0]) if samples.dim() else 0
        raise CalibrationError(
            f"{what} has {int(bad.sum())} NaN/Inf value(s); the first is in sample {first_sample}",
            where=where,
            fix=fix,
        )


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    text = f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CalibrationData", "load_calibration"]
