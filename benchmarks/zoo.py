"""Zoo sweep: trace, analyse and compress torchvision (and timm) architectures with random weights.

    .venv/bin/python benchmarks/zoo.py [--models resnet18 resnet50 ...] [--side 64] [--ratio 0.5]

Prints per model: groups found, prunable, pinned (and the first reason), unknown ops, parameter and MAC ratios,
keep-all error, held-out output error and seconds per stage. A model that fails prints its one-line error.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import grailc
from grailc.errors import GrailcError

DEFAULT = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small", "densenet121",
           "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x1_0", "squeezenet1_1", "resnext50_32x4d",
           "convnext_tiny", "vit_b_16", "swin_t"]


def build(name: str):
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False)
    return torchvision.models.get_model(name, weights=None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=DEFAULT)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    print(f"{'model':22} {'groups':>6} {'prunable':>8} {'params':>7} {'MACs':>7} {'keep-all':>9} {'out err':>8} "
          f"{'seconds':>8}  notes")
    for name in args.models:
        side = 224 if name in ("vit_b_16", "swin_t") else args.side
        g = torch.Generator().manual_seed(0)
        batches = [torch.randn(2, 3, side, side, generator=g) for _ in range(3)]
        start = time.perf_counter()
        try:
            result = grailc.compress(build(name).eval(), calib=batches, ratio=args.ratio, calib_held_out=1)
        except GrailcError as e:
            print(f"{name:22} failed: {e.line()[:150]}")
            continue
        r = result.report
        groups = r["groups"]
        prunable = [x for x in groups if not x["pinned"]]
        pinned = [x for x in groups if x["pinned"] and x["producers"]]
        notes = f"{len(pinned)} producer groups pinned" + (f" ({pinned[0]['pinned'][:70]})" if pinned else "")
        if r["unknown_ops"]:
            notes += f"; unknown ops: {sorted({u['op'] for u in r['unknown_ops']})[:3]}"
        print(f"{name:22} {len(groups):>6} {len(prunable):>8} {r['params_after'] / r['params_before']:>7.2f} "
              f"{r['macs_after'] / r['macs_before']:>7.2f} {r['verification']['keep_all_error']:>9.1e} "
              f"{r['output_error']['relative_l2']:>8.3f} {time.perf_counter() - start:>8.1f}  {notes}", flush=True)


if __name__ == "__main__":
    main()
