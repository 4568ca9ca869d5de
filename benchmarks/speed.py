"""Inference speed with ONNX Runtime: dense vs grailc vs Torch-Pruning, side by side in one run.

    .venv/bin/python benchmarks/speed.py [--models resnet18 resnet50 ...] [--ratios 0.3 0.5] [--multiple-of 1 auto 8]
        [--batch 1 32] [--repeats 30] [--threads 2] [--side 224] [--no-torch-pruning] [--plot speed.png]

For every model (random weights: speed does not depend on them) and ratio, grailc compresses it (data-free, a few
random batches) and Torch-Pruning's magnitude pruner prunes a copy at the same channel ratio (where it can prune the
model). SmolLM2 (shipped weights, token ids in) is compressed layer by layer (MLP widths and attention heads, as
``grailc compress hf:``) and measured on sequences of 128 tokens, MACs per sequence from
``grailc.llm.export.decoder_macs``; each pruned model is exported the way ``grailc compress`` exports
(``grailc.export.save_onnx``) and measured against the dense export with :func:`grailc.bench.compare` (interleaved
runs, median of per-pair ratios). Columns: ``MACs`` = MACs after / before, ``latency`` = measured latency after /
before, ``realised`` = their quotient, the measured speed-up as a fraction of the ideal (MACs) one.
``--multiple-of`` repeats grailc's rows with every kept width rounded to that multiple (auto: grailc's default).
The plot (matplotlib, when installed) shows ``realised`` per model.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import torch

import grailc
from grailc.bench import Settings, compare
from grailc.export import save_onnx
from grailc.metrics import count_macs
from grailc.recipe import parse_multiple
from grailc.trace import capture, export

MODELS = {  # name: (source, builder name)
    "resnet18": ("torchvision", "resnet18"),
    "resnet50": ("torchvision", "resnet50"),
    "mobilenet_v3": ("torchvision", "mobilenet_v3_large"),
    "efficientnet_lite0": ("timm", "efficientnet_lite0"),
    "convnext_t": ("torchvision", "convnext_tiny"),
    "deit_s": ("timm", "deit_small_patch16_224"),
}
TRANSFORMERS = {"deit_s"}
LLMS = {"smollm2": "SmolLM2-135M-Instruct"}  # shipped weights (grailc.llm.shipped); token ids in, logits out
LLM_TOKENS = 128  # sequence length of the decoder measurements (grailc compress hf: --bench measures the same)


def build(name: str) -> torch.nn.Module:
    source, arch = MODELS[name]
    torch.manual_seed(0)
    if source == "timm":
        import timm

        return timm.create_model(arch, pretrained=False).eval()
    import torchvision

    return torchvision.models.get_model(arch, weights=None).eval()


def onnx_of(module: torch.nn.Module, shape, path: Path) -> tuple[Path, int]:
    """The module exported as ``grailc compress`` exports, and its MACs per sample (grailc's counter)."""
    gm, example = capture(module, [shape])
    save_onnx(export(gm, example), example, path)
    return path, count_macs(gm, example)


def torch_pruning(model: torch.nn.Module, ratio: float, shape) -> torch.nn.Module:
    """Torch-Pruning's magnitude pruner (L1) at ``ratio`` of the channels, classifier kept, attention heads pruned
    as whole heads where the model declares them (timm ``Attention``: ``qkv`` and ``num_heads``)."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    example = torch.randn(*shape)
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    attention = {m.qkv: m.num_heads for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
        ignored_layers=classifier, num_heads=attention, prune_num_heads=bool(attention), prune_head_dims=False,
    )
    pruner.step()
    for m in model.modules():  # Torch-Pruning changes the layers; the head count lives on the module
        if hasattr(m, "qkv") and m.qkv in pruner.num_heads:
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
    return model.eval()


def decoder_onnx(model, path: Path) -> tuple[Path, int]:
    """A decoder LM exported as ``grailc compress hf:`` exports it, and its MACs per sequence of LLM_TOKENS."""
    from grailc.llm.export import decoder_macs, export_decoder_onnx

    export_decoder_onnx(model, torch.randint(0, model.config.vocab_size, (1, 64)), path)
    return path, decoder_macs(model, LLM_TOKENS)


def compress_decoder(model, ratio: float, multiple: int | str) -> torch.nn.Module:
    """grailc's layer-by-layer compression of MLP widths and attention heads on random token ids (speed depends on
    the widths only)."""
    from grailc.api import make_recipe
    from grailc.llm.layerwise import compress_layers

    small = copy.deepcopy(model)
    windows = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    recipe = make_recipe(ratio=ratio, targets=["mlp", "heads"], multiple_of=multiple, calib_batch_size=4, lam=0.1)
    compress_layers(small, windows, recipe.resolved(llm=True))
    return small


def dense_onnx(name: str, shape, path: Path) -> tuple[torch.nn.Module, tuple[Path, int]]:
    """The model (SmolLM2's shipped weights, else random) and its export to ``path`` with its MACs."""
    if name in LLMS:
        from grailc.llm.hf import load_causal_lm
        from grailc.llm.shipped import smollm2_folder

        model = load_causal_lm(smollm2_folder())[0]
        return model, decoder_onnx(model, path)
    model = build(name)
    return model, onnx_of(model, shape, path)


def random_calib(shape) -> list[torch.Tensor]:
    """Three random batches of two: data-free compression, for speed (sizes matter, not values)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, *shape[1:], generator=g) for _ in range(3)]


def methods(multiples: list[int | str], with_torch_pruning: bool) -> list[tuple[str, int | str | None]]:
    """(row name, multiple) for grailc at each ``--multiple-of``, and Torch-Pruning (multiple None)."""
    rows = [("grailc" + (f" mult {m}" if m != 1 else ""), m) for m in multiples]
    return rows + ([("torch-pruning", None)] if with_torch_pruning else [])


def pruned_onnx(model, llm: bool, ratio: float, multiple: int | str | None, shape, calib,
                path: Path) -> tuple[Path, int]:
    """The model pruned at ``ratio`` (grailc with kept widths multiples of ``multiple``; Torch-Pruning when None)
    and exported to ``path``, and its MACs."""
    if llm:
        return decoder_onnx(compress_decoder(model, ratio, multiple), path)
    small = torch_pruning(model, ratio, shape) if multiple is None else grailc.compress(
        model, calib=calib, ratio=ratio, multiple_of=multiple, calib_held_out=1, sequential=False,
        measure_latency=False).module  # speed: sizes matter, not values
    return onnx_of(small, shape, path)


def measure(dense: tuple[Path, int], pruned: tuple[Path, int], settings: Settings, shapes=None) -> list[dict]:
    ideal = dense[1] / pruned[1]
    bench = compare(dense[0], pruned[0], settings, shapes, ideal=ideal)
    return [{"batch": r["batch"], "macs": pruned[1] / dense[1], "latency": 1 / r["speedup"],
             "realised": r["realised_fraction_of_ideal"], "speedup": r["speedup"],
             "dense_ms": r["dense_ms"]["median"], "pruned_ms": r["compressed_ms"]["median"]} for r in bench["runs"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[*MODELS, *LLMS], choices=[*MODELS, *LLMS])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--multiple-of", type=parse_multiple, nargs="+", default=[1, "auto"],
                        help="grailc rows for each of these (1: exact widths; 8: every kept width a multiple of 8; "
                        "auto, the default: 8 in groups at least 64 channels wide)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per measured pair and batch")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--no-torch-pruning", action="store_true")
    parser.add_argument("--plot", default="speed.png", help="plot file (needs matplotlib; '' for none)")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    settings = Settings(batches=tuple(args.batch), repeats=args.repeats, warmup=3, max_seconds=args.max_seconds,
                        threads=args.threads, provider="auto")
    shape = (1, 3, args.side, args.side)
    print(f"ONNX Runtime, {args.threads} threads, {args.side}px, medians of up to {args.repeats} interleaved runs")
    header = (f"{'model':18} {'ratio':>5} {'method':16} {'batch':>5} {'MACs':>6} {'latency':>8} {'realised':>8} "
              f"{'dense ms':>9} {'pruned ms':>9}")
    print(header)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            llm = name in LLMS
            model, dense = dense_onnx(name, shape, Path(tmp) / f"{name}.onnx")
            calib = random_calib(shape)
            for ratio in args.ratios:
                for method, multiple in methods(args.multiple_of, not (args.no_torch_pruning or llm)):
                    start = time.perf_counter()
                    try:
                        pruned = pruned_onnx(model, llm, ratio, multiple, shape, calib, Path(tmp) / "pruned.onnx")
                        results = measure(dense, pruned, settings, [[1, LLM_TOKENS]] if llm else None)
                    except Exception as e:  # a pruner that cannot handle the model: say so, go on
                        print(f"{name:18} {ratio:>5.2f} {method:16} failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:100] if str(e).strip() else ''}", flush=True)
                        continue
                    for r in results:
                        rows.append({"model": name, "ratio": ratio, "method": method, **r})
                        print(f"{name:18} {ratio:>5.2f} {method:16} {r['batch']:>5} {r['macs']:>6.3f} "
                              f"{r['latency']:>8.3f} {r['realised']:>8.2f} {r['dense_ms']:>9.2f} "
                              f"{r['pruned_ms']:>9.2f}   ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.plot:
        plot(rows, args.plot)


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): table only, no plot")
        return
    if not rows:
        return
    labels = list(dict.fromkeys(f"{r['model']}\n{r['ratio']:g} b{r['batch']}" for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels)), 4))
    for k, method in enumerate(methods):
        values = {f"{r['model']}\n{r['ratio']:g} b{r['batch']}": r["realised"] for r in rows if r["method"] == method}
        ax.bar([i + k * width for i in range(len(labels))], [values.get(label, math.nan) for label in labels],
               width, label=method)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.set_ylabel("measured speed-up / ideal (MACs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
