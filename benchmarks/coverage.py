"""Coverage sweep: does grailc compress every torchvision classifier and a broad timm sample, and pass its checks?

    .venv/bin/python benchmarks/coverage.py [--zoo torchvision|timm|all] [--models NAME ...] [--side 64]
        [--ratio 0.3] [--targets channels,heads,embed]
        [--skip-larger-than 100] [--timeout 900] [--json out.json] [--threads 1] [--no-tp] [--debug]

Models: every torchvision classification model (``torchvision.models.list_models(module=torchvision.models)``) and
one small variant per timm family (``TIMM_FAMILIES``), all with random weights. ``--models`` takes bare names
(torchvision first, then timm) or ``torchvision:NAME`` / ``timm:NAME``.

Each model runs in its own subprocess (``--timeout`` seconds, 0 for none), so one hang or crash does not stop the
sweep. There it is built (``torch.manual_seed(0)``), given 3 random Gaussian calibration batches of 2 images and
compressed with ``grailc.compress(model, calib=batches, ratio=RATIO, calib_held_out=1)``; ``result.save(tmpdir)``
then exports ONNX and checks ONNX Runtime parity. Input side: timm's ``pretrained_cfg["input_size"]``, 224 for
torchvision; ``--side`` shrinks it where the model accepts it (timm models with ``fixed_input_size`` and models
whose forward fails at the smaller side keep their own).

A model *passes* when it compresses to params_after / params_before < 0.95 and every check passed (keep-all /
permutation check, finite held-out error, ONNX Runtime parity). Each row shows: groups, prunable groups, parameters
before (millions) and the after/before ratio, the permutation-check error, the ONNX relative difference, seconds
(compress + save), the Torch-Pruning comparison (TP groups / grailc groups with producers / producer sets equal)
and the status: ``ok`` or the one-line reason. Totals per zoo and counts per failure reason come last.

Torch-Pruning comparison: ``torch_pruning.DependencyGraph().build_dependency(model, example_inputs=x)``; for each
group of ``DG.get_all_groups()`` the producer set is the names of the (non-depthwise) Conv / Linear modules whose
*output* channels the group prunes (depthwise convs, norms and parameters are carriers in grailc's terms). grailc's
producer sets are ``report["groups"][i]["producers"]``. A Torch-Pruning failure is a note, not a failed model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

PASS_RATIO = 0.95  # a model passes when params_after / params_before is below this
CALIB_BATCHES, BATCH_SIZE, HELD_OUT = 3, 2, 1
TORCHVISION_SIDE = 224

# The smallest variant of each family in timm 1.0.31 by parameter count (meta-device count over
# timm.list_models("FAMILY*"); cspnet: timm.list_models(module="cspnet")). For vit, the smallest plain ImageNet
# ViT: the two smaller vit_* entries are feature backbones of other families (DINOv3, Perception Encoder).
TIMM_FAMILIES = {
    "resnet": "resnet10t",
    "resnext": "resnext26ts",
    "regnet": "regnetx_002",
    "efficientnet": "efficientnet_lite0",
    "mobilenetv3": "mobilenetv3_small_050",
    "convnext": "convnext_zepto_rms",
    "convnextv2": "convnextv2_atto",
    "densenet": "densenet121",
    "ghostnet": "ghostnet_050",
    "rexnet": "rexnet_100",
    "vit": "vit_tiny_patch16_224",
    "deit": "deit_tiny_patch16_224",
    "beit": "beit_base_patch16_224",
    "swin": "swin_tiny_patch4_window7_224",
    "mixer": "mixer_s16_224",
    "poolformer": "poolformerv2_s12",
    "levit": "levit_128s",
    "cait": "cait_xxs24_224",
    "eva": "eva02_tiny_patch14_224",
    "mobilevit": "mobilevit_xxs",
    "efficientformer": "efficientformerv2_s0",
    "fastvit": "fastvit_t8",
    "repvgg": "repvgg_a0",
    "dla": "dla46x_c",
    "cspnet": "cs3darknet_focus_s",
    "edgenext": "edgenext_xx_small",
    "coatnet": "coatnet_pico_rw_224",
    "xcit": "xcit_nano_12_p16_224",  # p8 has 4k fewer parameters but 4x the tokens
    "pit": "pit_ti_224",
    "twins": "twins_svt_small",
}
# The common members next to the smallest ones: LayerNorm ConvNeXt and EfficientNet with squeeze-excitation.
TIMM_EXTRAS = ["convnext_atto", "efficientnet_b0"]


@dataclasses.dataclass(frozen=True)
class Spec:
    zoo: str  # "torchvision" or "timm"
    name: str

    @property
    def key(self) -> str:
        return f"{self.zoo}:{self.name}"


# --------------------------------------------------------------------------------------------------- model lists


def torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def timm_names() -> list[str]:
    return list(TIMM_FAMILIES.values()) + TIMM_EXTRAS


def resolve(name: str, zoo: str) -> Spec:
    """``timm:NAME`` / ``torchvision:NAME``, else the first zoo (of those selected) that has ``name``."""
    if ":" in name:
        prefix, bare = name.split(":", 1)
        return Spec(prefix, bare)
    if zoo in ("torchvision", "all") and name in torchvision_names():
        return Spec("torchvision", name)
    return Spec("timm", name)


def select(args) -> list[Spec]:
    if args.models:
        return [resolve(n, args.zoo) for n in args.models]
    specs = []
    if args.zoo in ("torchvision", "all"):
        specs += [Spec("torchvision", n) for n in torchvision_names()]
    if args.zoo in ("timm", "all"):
        specs += [Spec("timm", n) for n in timm_names()]
    return specs


def build(spec: Spec) -> torch.nn.Module:
    """The model with random weights, in eval mode."""
    if spec.zoo == "timm":
        import timm

        if spec.name not in timm.list_models():
            raise LookupError(f"timm {timm.__version__} has no model {spec.name!r}")
        return timm.create_model(spec.name, pretrained=False).eval()
    if spec.zoo == "torchvision":
        import torchvision

        return torchvision.models.get_model(spec.name, weights=None).eval()
    raise LookupError(f"unknown zoo {spec.zoo!r} (use torchvision: or timm:)")


def size_millions(spec: Spec) -> float | None:
    """Parameter count in millions, from a meta-device build (no memory, no init cost); None if that fails."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = build(spec)
        return sum(p.numel() for p in model.parameters()) / 1e6
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------- inputs


def default_side(model: torch.nn.Module, spec: Spec) -> tuple[int, bool]:
    """(input side, fixed?) from timm's pretrained_cfg; torchvision models: 224, not known to be fixed."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if spec.zoo == "timm" and cfg.get("input_size"):
        return int(cfg["input_size"][-1]), bool(cfg.get("fixed_input_size", False))
    return TORCHVISION_SIDE, False


def runs_at(model: torch.nn.Module, side: int) -> bool:
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, side, side))
        return True
    except Exception:
        return False


def input_side(model: torch.nn.Module, spec: Spec, requested: int | None) -> int:
    """The requested side where the model accepts it, else the model's default."""
    side, fixed = default_side(model, spec)
    if requested is None or requested >= side or fixed:
        return side
    return requested if runs_at(model, requested) else side


def calibration(side: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(BATCH_SIZE, 3, side, side, generator=g) for _ in range(CALIB_BATCHES)]


# --------------------------------------------------------------------------------------------------- reasons


def one_line(e: BaseException) -> str:
    """The exception's one-line message: a GrailcError's own line, else 'Type: first line'."""
    from_grailc = type(e).__module__.startswith("grailc")
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    line = first if from_grailc and first else f"{type(e).__name__}: {first}"
    return line[:400]


def reason_kind(e: BaseException) -> str:
    """A coarse key to count failures by: the exception type and its 'what' (no location), numbers elided."""
    what = getattr(e, "what", None) or (str(e).strip().splitlines() or [""])[0]
    return re.sub(r"\d+", "#", f"{type(e).__name__}: {what}")[:120]


# --------------------------------------------------------------------------------------------------- grailc


def figures(report: dict) -> dict:
    """The row's numbers from a (possibly partial) grailc report."""
    groups = report.get("groups") or []
    verification = report.get("verification") or {}
    before, after = report.get("params_before"), report.get("params_after")
    return {
        "groups": len(groups) if groups else None,
        "prunable": sum(1 for g in groups if not g["pinned"]) if groups else None,
        "params_before": before,
        "params_after": after,
        "param_ratio": after / before if before and after else None,
        "macs_ratio": report["macs_after"] / report["macs_before"] if report.get("macs_after") else None,
        "perm_error": verification.get("permutation_error", verification.get("keep_all_error")),
        "onnx_rel_diff": (report.get("onnx") or {}).get("relative_diff"),
        "output_error": (report.get("output_error") or {}).get("relative_l2"),
    }


def not_compressed_reason(report: dict, ratio: float) -> str:
    pinned = [g["pinned"] for g in report.get("groups") or [] if g["pinned"] and g["producers"]]
    text = f"not compressed: params x{ratio:.3f} >= {PASS_RATIO}"
    return text + (f" ({len(pinned)} producer groups pinned, e.g. {pinned[0][:150]})" if pinned else "")


def run_grailc(model: torch.nn.Module, batches: list[torch.Tensor], ratio: float, debug: bool,
               targets: list[str] | None = None) -> dict:
    """compress + save into a temporary folder; the row's status, reason and figures."""
    import grailc

    start = time.perf_counter()
    report: dict = {}
    try:
        result = grailc.compress(model, calib=batches, ratio=ratio, calib_held_out=HELD_OUT, targets=targets)
        report = result.report
        with tempfile.TemporaryDirectory() as tmp:
            result.save(Path(tmp) / "out")
    except Exception as e:  # any failure is the row's status; the report so far gives the figures
        if debug:
            traceback.print_exc()
        report = getattr(e, "report", None) or report
        row = {"status": one_line(e), "reason_kind": reason_kind(e), "passed": False, **figures(report)}
    else:
        row = {"status": "ok", "reason_kind": None, "passed": True, **figures(report)}
        if not (row["param_ratio"] is not None and row["param_ratio"] < PASS_RATIO):
            row["status"] = not_compressed_reason(report, row["param_ratio"] or 1.0)
            row["reason_kind"] = re.sub(r"\d+", "#", row["status"])[:120]
            row["passed"] = False
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["producer_sets"] = [sorted(set(g["producers"])) for g in report.get("groups") or [] if g["producers"]]
    return row


# --------------------------------------------------------------------------------------------------- Torch-Pruning


def tp_producer_sets(model: torch.nn.Module, x: torch.Tensor) -> list[frozenset[str]]:
    """Torch-Pruning's coupled groups as sets of the Conv/Linear module names whose output channels they prune."""
    import torch_pruning as tp

    names = {id(m): n for n, m in model.named_modules()}
    producer_types = (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR)  # depthwise convs are OPTYPE.DEPTHWISE_CONV
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
        groups = list(dg.get_all_groups())
    sets = []
    for group in groups:
        producers = frozenset(
            names[id(item.dep.target.module)]
            for item in group
            if dg.is_out_channel_pruning_fn(item.dep.handler)
            and tp.ops.module2type(item.dep.target.module) in producer_types
            and id(item.dep.target.module) in names
        )
        if producers and producers not in sets:
            sets.append(producers)
    return sets


def compare_groups(tp_sets: list[frozenset[str]], grailc_sets: list[frozenset[str]]) -> dict:
    """Counts and a few examples of the producer sets only one side has; no comparison without grailc groups."""
    tp_set, gc_set = set(tp_sets), set(grailc_sets)
    if not gc_set:  # grailc failed before its analysis: nothing to compare with
        return {"tp_groups": len(tp_set), "grailc_groups": None, "matched": None}
    return {
        "tp_groups": len(tp_set),
        "grailc_groups": len(gc_set),
        "matched": len(tp_set & gc_set),
        "only_tp": [sorted(s) for s in list(tp_set - gc_set)[:5]],
        "only_grailc": [sorted(s) for s in list(gc_set - tp_set)[:5]],
    }


def run_tp(model: torch.nn.Module, x: torch.Tensor, grailc_sets: list[list[str]]) -> dict:
    start = time.perf_counter()
    try:
        tp_sets = tp_producer_sets(model, x)
    except Exception as e:  # Torch-Pruning's failure is a note, not a failed model
        return {"note": f"torch-pruning failed: {one_line(e)}", "seconds": round(time.perf_counter() - start, 2)}
    out = compare_groups(tp_sets, [frozenset(s) for s in grailc_sets])
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


# --------------------------------------------------------------------------------------------------- one model


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def worker(args) -> None:
    """One model in this process; the row is written to --result-file after each stage (a timeout keeps it)."""
    zoo, name = args.worker.split(":", 1)
    spec, out = Spec(zoo, name), Path(args.result_file)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    row: dict = {"stage": "build"}
    write_json(out, row)
    try:
        torch.manual_seed(0)
        model = build(spec)
        row["side"] = side = input_side(model, spec, args.side)
    except Exception as e:
        row.update(status=f"build failed: {one_line(e)}", reason_kind=f"build failed: {reason_kind(e)}")
        write_json(out, row)
        return
    batches = calibration(side)
    write_json(out, {**row, "stage": "grailc"})
    targets = args.targets.split(",") if args.targets else None
    row.update(run_grailc(model, batches, args.ratio, args.debug, targets), stage="torch-pruning")
    write_json(out, row)
    if not args.no_tp:
        row["tp"] = run_tp(model, batches[0][:1], row["producer_sets"])
    row["stage"] = "done"
    write_json(out, row)


def run_isolated(spec: Spec, args) -> dict:
    """Run ``worker`` for ``spec`` in a subprocess under the timeout; the row it left."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec.key, "--result-file", str(result),
               "--ratio", str(args.ratio)]
        cmd += ["--targets", args.targets] if args.targets else []
        cmd += ["--side", str(args.side)] if args.side else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--no-tp"] if args.no_tp else []
        cmd += ["--debug"] if args.debug else []
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout or None)
            timed_out, code, stderr = False, proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:  # subprocess.run has killed the worker
            timed_out, code = True, None
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        row = json.loads(result.read_text()) if result.exists() else {"stage": "start"}
    row.update(zoo=spec.zoo, model=spec.name, wall_seconds=round(time.perf_counter() - start, 1))
    if args.debug and stderr.strip():
        print(stderr.rstrip(), file=sys.stderr)
    last = (stderr.strip().splitlines() or ["no output"])[-1][:300]
    if row["stage"] == "torch-pruning" and (timed_out or code != 0):  # grailc's row stands; TP gets a note
        row["tp"] = {"note": f"torch-pruning timed out (--timeout {args.timeout:g})" if timed_out
                     else f"torch-pruning killed the worker (exit {code}): {last}"}
    elif timed_out:
        row.update(status=f"timeout after {args.timeout:g}s (in {row['stage']})", reason_kind="timeout", passed=False)
    elif code != 0 or "status" not in row:
        row.update(status=f"worker died (exit {code}, in {row['stage']}): {last}", passed=False,
                   reason_kind=f"worker died in {row['stage']}")
    row.setdefault("passed", False)
    row.pop("producer_sets", None)
    return row


def skipped_row(spec: Spec, size: float, limit: float) -> dict:
    return {"zoo": spec.zoo, "model": spec.name, "status": f"skipped: {size:.1f}M params > {limit:g}M",
            "skipped": True, "size_m": round(size, 2), "passed": False}


# --------------------------------------------------------------------------------------------------- output


def fmt(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


HEADER = (f"{'model':32} {'side':>4} {'groups':>6} {'prun.':>5} {'params M':>8} {'after':>6} {'perm err':>8} "
          f"{'onnx rel':>8} {'sec':>6} {'TP/gc/=':>11}  status")


def format_row(row: dict) -> str:
    if row.get("skipped"):
        return f"{row['model']:32} {row['status']}"
    tp = row.get("tp") or {}
    tp_text = "/".join("-" if tp.get(k) is None else str(tp[k]) for k in ("tp_groups", "grailc_groups", "matched"))
    before = row.get("params_before")
    line = (f"{row['model']:32} {fmt(row.get('side'), 'd', 4)} {fmt(row.get('groups'), 'd', 6)} "
            f"{fmt(row.get('prunable'), 'd', 5)} {fmt(before / 1e6 if before else None, '.2f', 8)} "
            f"{fmt(row.get('param_ratio'), '.3f', 6)} {fmt(row.get('perm_error'), '.1e', 8)} "
            f"{fmt(row.get('onnx_rel_diff'), '.1e', 8)} {fmt(row.get('seconds'), '.1f', 6)} {tp_text:>11}  "
            f"{row['status']}")
    if tp.get("note"):
        line += f"\n{'':34}note: {tp['note']}"
    return line


def totals(rows: list[dict]) -> str:
    lines = ["", "totals"]
    for zoo in sorted({r["zoo"] for r in rows}):
        mine = [r for r in rows if r["zoo"] == zoo]
        tried = [r for r in mine if not r.get("skipped")]
        passed = sum(r["passed"] for r in tried)
        pct = 100 * passed / len(tried) if tried else 0.0
        skipped = len(mine) - len(tried)
        lines.append(f"  {zoo:12} {passed}/{len(tried)} passed ({pct:.1f}%)" + (f", {skipped} skipped" if skipped
                                                                                  else ""))
    reasons: dict[str, int] = {}
    for r in rows:
        if not r["passed"] and not r.get("skipped"):
            reasons[r.get("reason_kind") or r["status"]] = reasons.get(r.get("reason_kind") or r["status"], 0) + 1
    if reasons:
        lines.append("failures by reason")
        lines += [f"  {n:4}  {k}" for k, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))]
    compared = [r["tp"] for r in rows if (r.get("tp") or {}).get("matched") is not None]
    if compared:
        lines.append(
            f"Torch-Pruning: {len(compared)} models compared, {sum(c['tp_groups'] for c in compared)} TP groups, "
            f"{sum(c['grailc_groups'] for c in compared)} grailc groups with producers, "
            f"{sum(c['matched'] for c in compared)} producer sets equal; "
            f"{sum(c['tp_groups'] == c['grailc_groups'] == c['matched'] for c in compared)} models match exactly"
        )
    failed_tp = sum(bool((r.get("tp") or {}).get("note")) for r in rows)
    if failed_tp:
        lines.append(f"Torch-Pruning failed or timed out on {failed_tp} models (see notes)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", help="a subset: NAME, torchvision:NAME or timm:NAME")
    parser.add_argument("--zoo", choices=["torchvision", "timm", "all"], default="all")
    parser.add_argument("--side", type=int, help="shrink the input side to this where the model accepts it")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--targets", help="grailc --targets, e.g. channels,heads,embed (default: grailc's default)")
    parser.add_argument("--skip-larger-than", type=float, metavar="N", help="skip models over N million params")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model (0: none)")
    parser.add_argument("--json", type=Path, help="write the rows here (rewritten after every model)")
    parser.add_argument("--threads", type=int, help="torch threads per model (default: torch's)")
    parser.add_argument("--no-tp", action="store_true", help="skip the Torch-Pruning comparison")
    parser.add_argument("--debug", action="store_true", help="print the workers' tracebacks and stderr")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    specs = select(args)
    print(f"{len(specs)} models, ratio {args.ratio}, side {args.side or 'default'}, timeout {args.timeout or 'none'}")
    print(HEADER, flush=True)
    rows = []
    for spec in specs:
        size = size_millions(spec) if args.skip_larger_than is not None else None
        if size is not None and size > args.skip_larger_than:
            row = skipped_row(spec, size, args.skip_larger_than)
        else:
            row = run_isolated(spec, args)
        rows.append(row)
        print(format_row(row), flush=True)
        if args.json:
            write_json(args.json, rows)
    print(totals(rows))


if __name__ == "__main__":
    main()
