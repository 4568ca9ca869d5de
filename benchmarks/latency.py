"""Inference speed: dense vs compressed, side by side in one run, in PyTorch and ONNX Runtime.

    .venv/bin/python benchmarks/latency.py [--models resnet18 mobilenet_v2] [--ratios 0.25 0.5] [--batch 1 8]

ONNX Runtime uses the CUDA provider when a GPU is present, else the CPU provider. Figures are medians of repeated
runs; the ratio column (compressed / dense) is what to read, since machines are noisy.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision

import grailc
from grailc.export import ort_providers, save_onnx
from grailc.metrics import latency_ms
from grailc.trace import export


def ort_ms(module, example, x, repeats: int) -> float:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        save_onnx(export(module, example), example, path)
        session = ort.InferenceSession(str(path), providers=ort_providers())
        name = session.get_inputs()[0].name
        return latency_ms(session.run, (None, {name: x.numpy()}), repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    print(f"ONNX Runtime providers: {ort_providers()}; torch threads: {torch.get_num_threads()}")
    print(f"{'model':14} {'ratio':>5} {'batch':>5} {'torch dense':>12} {'torch comp':>11} {'x':>5} "
          f"{'ort dense':>10} {'ort comp':>9} {'x':>5}")
    for name in args.models:
        model = torchvision.models.get_model(name, weights=None).eval()
        g = torch.Generator().manual_seed(0)
        calib = [torch.randn(4, 3, args.side, args.side, generator=g) for _ in range(3)]
        for ratio in args.ratios:
            result = grailc.compress(model, calib=calib, ratio=ratio, calib_held_out=1)
            for batch in args.batch:
                x = torch.randn(batch, 3, args.side, args.side)
                with torch.no_grad():
                    td = latency_ms(result.reference, (x,), args.repeats)
                    tc = latency_ms(result.module, (x,), args.repeats)
                od = ort_ms(result.reference, result.example, x, args.repeats)
                oc = ort_ms(result.module, result.example, x, args.repeats)
                print(f"{name:14} {ratio:>5.2f} {batch:>5} {td:>12.2f} {tc:>11.2f} {tc / td:>5.2f} {od:>10.2f} "
                      f"{oc:>9.2f} {oc / od:>5.2f}", flush=True)


if __name__ == "__main__":
    main()
