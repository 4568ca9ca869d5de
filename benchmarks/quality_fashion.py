"""Quality benchmark on the real trained Fashion-MNIST ResNet: test accuracy per ratio, selector and compensation.

    .venv/bin/python benchmarks/quality_fashion.py [--ratios 0.25 0.5 0.65] [--test-images 10000] [--plot out.png]

Prints one table (accuracy in %, dense first) and, with --plot and matplotlib installed, draws accuracy vs ratio.

    .venv/bin/python benchmarks/quality_fashion.py --grid [--ratios 0.5] [--selectors wanda random]

instead prints, per ratio, selector and calibration mode (one-shot, --sequential), the accuracy of every
compensator (none, grail, bias, grail+bias) without and with --repair. Repair runs after apply and changes only
BatchNorm statistics, so it is measured on a copy of the same compressed model.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import grailc
from grailc.demo import calibration_batches
from grailc.fashion_mnist import accuracy, load_fashion_mnist
from grailc.models.fashion_resnet import load_pretrained

METHODS = {
    "plain": dict(compensate="none"),
    "grail": dict(compensate="grail"),
    "grail-seq": dict(compensate="grail", sequential=True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.65])
    parser.add_argument("--selectors", nargs="+", default=["magnitude", "wanda"])
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--plot")
    parser.add_argument("--grid", action="store_true", help="every compensator, with and without --repair")
    args = parser.parse_args()
    if args.grid:
        return grid(args)
    torch.set_flush_denormal(True)
    model = load_pretrained()
    images, labels = load_fashion_mnist("test")
    images, labels = images[: args.test_images], labels[: args.test_images]
    batches = calibration_batches()
    dense = accuracy(model, images, labels)
    calib_images = sum(len(b) for b in batches)
    print(f"dense test accuracy: {100 * dense:.2f}% on {len(labels)} images; calibration: {calib_images}"
          " unlabeled training images (2 batches held out)")
    header = f"{'ratio':>6} {'selector':>10} " + " ".join(f"{m:>10}" for m in METHODS) + f" {'seconds':>8}"
    print(header)
    rows = []
    for ratio in args.ratios:
        for selector in args.selectors:
            start = time.perf_counter()
            accs = {}
            for name, options in METHODS.items():
                result = grailc.compress(model, calib=batches, ratio=ratio, selector=selector, calib_held_out=2,
                                         **options)
                accs[name] = accuracy(result.module, images, labels)
            rows.append((ratio, selector, accs))
            print(f"{ratio:>6.2f} {selector:>10} " + " ".join(f"{100 * accs[m]:>10.2f}" for m in METHODS)
                  + f" {time.perf_counter() - start:>8.1f}", flush=True)
    if args.plot:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for selector in args.selectors:
            for name in METHODS:
                pts = [(r, a[name]) for r, s, a in rows if s == selector]
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=f"{selector} + {name}")
        ax.axhline(100 * dense, color="gray", linestyle="--", label="dense")
        ax.set_xlabel("ratio of channels removed")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


COMPENSATORS = ["none", "grail", "bias", "grail+bias"]


def grid(args) -> None:
    from grailc.passes.repair import repair_batch_norms

    torch.set_flush_denormal(True)
    model = load_pretrained()
    images, labels = load_fashion_mnist("test")
    images, labels = images[: args.test_images], labels[: args.test_images]
    batches = calibration_batches()
    fit = [(b,) for b in batches[:-2]]
    print(f"dense test accuracy: {100 * accuracy(model, images, labels):.2f}% on {len(labels)} images")
    print(f"{'ratio':>6} {'selector':>9} {'mode':>10} {'repair':>6} " + " ".join(f"{c:>10}" for c in COMPENSATORS))
    for ratio in args.ratios:
        for selector in args.selectors:
            for sequential in (False, True):
                accs = {False: {}, True: {}}
                for compensate in COMPENSATORS:
                    result = grailc.compress(model, calib=batches, ratio=ratio, selector=selector,
                                             compensate=compensate, sequential=sequential, calib_held_out=2)
                    accs[False][compensate] = accuracy(result.module, images, labels)
                    repaired = copy.deepcopy(result.module)
                    repair_batch_norms(repaired, fit)
                    accs[True][compensate] = accuracy(repaired, images, labels)
                mode = "sequential" if sequential else "one-shot"
                for repair in (False, True):
                    print(f"{ratio:>6.2f} {selector:>9} {mode:>10} {'yes' if repair else 'no':>6} "
                          + " ".join(f"{100 * accs[repair][c]:>10.2f}" for c in COMPENSATORS), flush=True)


if __name__ == "__main__":
    main()
