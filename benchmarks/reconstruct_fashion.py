"""Local reconstruction on the Fashion-MNIST models: GRAIL, GRAIL + reconstruct, plain pruning + reconstruct.

    .venv/bin/python benchmarks/reconstruct_fashion.py [--model resnet|vit] [--ratios 0.5 0.7 0.8]
        [--calib 128 1024] [--methods grail grail+rc plain+rc] [--kind block] [--steps 300] [--lr 3e-3]
        [--batch 32] [--targets channels,heads] [--test-images 10000] [--threads 1]

Prints one line per (ratio, calibration images, method): test accuracy (%), the compile's wall time, the time of
the reconstruct pass and the compile's peak resident memory. Every cell runs in a fresh process, so that the peak
memory is that compile's (the loaded model and data included). Calibration uses the first N unlabeled training
images in batches of ``--batch``, all of them for fitting (no held-out batch); the test labels only score.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = {  # measured one-shot (--one-shot): reconstruction starts better from one-shot GRAIL than from sequential
    "grail": dict(compensate="grail", sequential=False),
    "grail+rc": dict(compensate="grail", sequential=False, reconstruct="block"),
    "plain+rc": dict(compensate="none", sequential=False, reconstruct="block"),
    "grail-seq": dict(compensate="grail", sequential=True),
    "grail-seq+rc": dict(compensate="grail", sequential=True, reconstruct="block"),
}


def cell(args) -> None:
    import torch

    import grailc
    from grailc.fashion_mnist import accuracy, load_fashion_mnist, to_inputs

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    if args.model == "vit":
        from grailc.models.fashion_vit import load_fashion_vit

        model = load_fashion_vit().eval()
    else:
        from grailc.models.fashion_resnet import load_pretrained

        model = load_pretrained()
    train, _ = load_fashion_mnist("train")
    batches = list(to_inputs(train[: args.images]).split(args.batch))
    options = dict(METHODS[args.method])
    if "reconstruct" in options:
        options.update(reconstruct=args.kind, reconstruct_steps=args.steps, reconstruct_lr=args.lr,
                       reconstruct_params=args.params, reconstruct_fed=args.fed)
    start = time.perf_counter()
    result = grailc.compress(model, calib=batches, ratio=args.ratio, selector=args.selector, calib_held_out=0,
                             targets=args.targets.split(","), measure_latency=False, **options)
    seconds = time.perf_counter() - start
    images, labels = load_fashion_mnist("test")
    rc = result.report.get("reconstruct", {})
    print(json.dumps({
        "accuracy": 100 * accuracy(result.module, images[: args.test_images], labels[: args.test_images]),
        "seconds": round(seconds, 1),
        "reconstruct_seconds": rc.get("seconds"),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "params": result.report["params_after"] / result.report["params_before"],
    }))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet", choices=["resnet", "vit"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.8])
    parser.add_argument("--calib", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--methods", nargs="+", default=["grail", "grail+rc", "plain+rc"], choices=list(METHODS))
    parser.add_argument("--selector", default="wanda")
    parser.add_argument("--targets", default="channels,heads")
    parser.add_argument("--kind", default="block")
    parser.add_argument("--steps", type=int, default=300)  # the recipe defaults
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--params", default="all")
    parser.add_argument("--fed", default="compressed")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per compile (default 1: on a busy "
                        "2-core machine two threads made small windows up to 15x slower)")
    parser.add_argument("--cell", nargs=3, metavar=("RATIO", "IMAGES", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        args.ratio, args.images, args.method = float(args.cell[0]), int(args.cell[1]), args.cell[2]
        return cell(args)
    print(f"model {args.model}, selector {args.selector}, targets {args.targets}; reconstruct: {args.kind}, "
          f"{args.steps} Adam steps per window, lr {args.lr}, batch {args.batch}, params {args.params}, "
          f"fed {args.fed}; accuracy on {args.test_images} test images; {args.threads} thread(s)")
    print(f"{'ratio':>5} {'images':>6} {'method':>9} {'acc %':>7} {'params':>6} {'total s':>8} {'recon s':>8} "
          f"{'peak MiB':>8}", flush=True)
    passthrough = ["--model", args.model, "--selector", args.selector, "--targets", args.targets, "--kind",
                   args.kind, "--steps", str(args.steps), "--lr", str(args.lr), "--params", args.params, "--fed",
                   args.fed, "--batch", str(args.batch), "--test-images", str(args.test_images),
                   "--threads", str(args.threads)]
    for ratio in args.ratios:
        for images in args.calib:
            for method in args.methods:
                run = subprocess.run([sys.executable, __file__, *passthrough, "--cell", str(ratio), str(images),
                                      method], capture_output=True, text=True)
                if run.returncode != 0:
                    print(f"{ratio:>5} {images:>6} {method:>9} failed: {run.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(run.stdout.strip().splitlines()[-1])
                recon = "" if r["reconstruct_seconds"] is None else f"{r['reconstruct_seconds']:.1f}"
                print(f"{ratio:>5} {images:>6} {method:>9} {r['accuracy']:>7.2f} {r['params']:>6.3f} "
                      f"{r['seconds']:>8.1f} {recon:>8} {r['peak_rss_mib']:>8}", flush=True)


if __name__ == "__main__":
    main()
