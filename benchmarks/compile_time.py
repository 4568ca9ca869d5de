"""Compile time: grailc's stages against one dense forward pass over the calibration data, and against
Torch-Pruning's dependency-graph build plus pruning, on the same model in one run.

    .venv/bin/python benchmarks/compile_time.py [--model resnet50] [--images 128] [--size 224] [--batch 16]
        [--device auto|cpu|cuda]

Prints, per stage, seconds and the ratio to the dense forward pass (the unit the goals are stated in: the default
pipeline's stages but export at most 2x, sequential calibration at most 3x). Random weights and random images:
the time does not depend on them. One-shot and sequential (the default) are both run; ``--kernel-solves taps
channels`` adds a sequential column with k x k convolutions solved over channels (``--kernel-solve channels``).

``--float64-products`` runs both modes a second time with the Gram products in float64 (as before float32
products were the default) and prints the calibration times side by side and how far the two compressed models'
outputs are apart, relative to how far each is from the dense model.

``--device`` (default auto: CUDA when there is one) is where the dense forward and the compile compute, as
``grailc compress --device`` does (traced on the CPU, the passes on the device, float32 without TF32 for both);
on a GPU the forward is timed after one warm-up batch, synchronised.
"""

from __future__ import annotations

import argparse
import copy
import time
from unittest import mock

import torch
import torchvision

import grailc
from grailc.device import exact_float32, resolve_device

STAGES = ("trace", "analyse", "calibrate", "select", "compensate", "apply", "verify")


def dense_forward(model, batches, device: torch.device) -> float:
    """Seconds of one forward pass over ``batches`` on ``device`` (the model and the batches moved there first)."""
    model = copy.deepcopy(model).to(device)
    batches = [x.to(device) for x in batches]
    with torch.no_grad(), exact_float32(device):
        if device.type == "cuda":
            model(batches[0])  # cuDNN picks its kernels on the first call
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for x in batches:
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


def torch_pruning_seconds(model, example, ratio: float) -> tuple[float, float]:
    """Seconds of Torch-Pruning's DependencyGraph build (inside the pruner) and of its pruning step."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=classifier)
    built = time.perf_counter()
    pruner.step()
    return built - start, time.perf_counter() - built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--kernel-solves", nargs="+", default=["taps"], choices=("taps", "channels"),
                        help="the sequential columns: taps (the default) and/or channels (--kernel-solve)")
    parser.add_argument("--float64-products", action="store_true",
                        help="also calibrate with float64 products and compare")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto: CUDA when available)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    batches = list(torch.randn(args.images, 3, args.size, args.size).split(args.batch))
    dense = dense_forward(model, batches, device)
    print(f"{args.model}, {args.images} images of {args.size} px in batches of {args.batch}, ratio {args.ratio}, "
          f"on {device}; one dense forward pass over them: {dense:.2f} s")
    rows, modules = {}, {}
    modes = [("one-shot", False, "channels")]
    modes += [("sequential" if solve == "taps" else f"seq. {solve}", True, solve) for solve in args.kernel_solves]
    for mode, sequential, solve in modes:
        result = grailc.compress(model, calib=batches, ratio=args.ratio, sequential=sequential, calib_held_out=1,
                                 measure_latency=False, onnx=False, kernel_solve=solve, device=device)
        rows[mode], modules[mode] = result.report["timings"], result.module
    built, pruned = torch_pruning_seconds(model, batches[0][:1], args.ratio)
    print(f"{'stage':>12} " + " ".join(f"{m + ' s':>14} {'x fwd':>6}" for m in rows))
    for stage in (*STAGES, "total"):
        cells = []
        for timings in rows.values():
            seconds = sum(timings.get(s, 0.0) for s in STAGES) if stage == "total" else timings.get(stage, 0.0)
            cells.append(f"{seconds:>14.1f} {seconds / dense:>6.2f}")
        print(f"{stage:>12} " + " ".join(cells))
    print(f"Torch-Pruning: dependency graph {built:.1f} s ({built / dense:.2f} x fwd), pruning step {pruned:.1f} s "
          f"({pruned / dense:.2f} x fwd); no calibration, no compensation, no verification")
    if args.float64_products:
        compare_float64(model, batches, args.ratio, rows, modules, device)


def compare_float64(model, batches, ratio: float, rows: dict, modules: dict, device: torch.device) -> None:
    """Calibration with float64 products against the float32 ones just run: seconds, and the distance between
    the two compressed models' outputs on the held-out batch relative to their distance from the dense model."""
    from grailc.passes import calibrate

    x = batches[-1]
    with torch.no_grad():
        dense = model(x)
    print(f"{'mode':>12} {'calib f32 s':>12} {'calib f64 s':>12} {'f64/f32':>8} {'|y32-y64|/|y64-y|':>18}")
    for mode, sequential in (("one-shot", False), ("sequential", True)):
        with mock.patch.object(calibrate, "row_dtype", lambda t: torch.float64):
            result = grailc.compress(model, calib=batches, ratio=ratio, sequential=sequential, calib_held_out=1,
                                     measure_latency=False, onnx=False, device=device)
        with torch.no_grad():
            y32, y64 = modules[mode](x), result.module(x)
        apart = float((y32 - y64).norm() / (y64 - dense).norm())
        t32, t64 = rows[mode]["calibrate"], result.report["timings"]["calibrate"]
        print(f"{mode:>12} {t32:>12.1f} {t64:>12.1f} {t64 / t32:>8.2f} {apart:>18.2e}")


if __name__ == "__main__":
    main()
