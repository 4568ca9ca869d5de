"""Real photos shipped with scikit-image and scikit-learn, preprocessed like ImageNet evaluation."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from grailc.calib_data import IMAGENET_MEAN, IMAGENET_STD

SKIMAGE_PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "motorcycle_left")


def photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    found = {}
    for name in SKIMAGE_PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is not None:
            try:
                found[name] = np.asarray(loader())
            except Exception:  # noqa: BLE001 - images fetched from the internet are not available
                continue
    sample = load_sample_images()
    for fname, img in zip(sample.filenames, sample.images):
        found[fname.rsplit("/", 1)[-1].split(".")[0]] = img
    return found


def _normalise(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def center_crops(images: dict[str, np.ndarray], size: int = 224) -> torch.Tensor:
    out = []
    for img in images.values():
        im = Image.fromarray(img).convert("RGB")
        w, h = im.size
        scale = round(size / 0.875) / min(w, h)
        im = im.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        out.append(_normalise(im.crop((left, top, left + size, top + size))))
    return torch.stack(out)


def random_crops(images: dict[str, np.ndarray], count: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Random-scale crops of the photos: real-image calibration data."""
    rng = np.random.default_rng(seed)
    pics = [Image.fromarray(img).convert("RGB") for img in images.values()]
    out = []
    for i in range(count):
        im = pics[i % len(pics)]
        w, h = im.size
        side = int(min(w, h) * rng.uniform(0.35, 1.0))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
        out.append(_normalise(crop))
    return torch.stack(out)
