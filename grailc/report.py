"""The report: what changed, what it cost, and every check's figure, as JSON plus a short table."""

from __future__ import annotations

import platform
import sys

import torch


def versions() -> dict:
    import onnx
    import onnxruntime
    import torchvision

    import grailc

    return {
        "grailc": grailc.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def group_records(deps, decisions: dict, folds: dict, rows: dict | None = None) -> list[dict]:
    """One record per channel group: structure, decision and reconstruction errors (mean over consumer slots)."""
    records = []
    for g in deps.groups.values():
        d = decisions.get(g.id)
        slot_folds = [folds[s.key] for s in g.consumers if s.key in folds]
        records.append(
            {
                "id": g.id,
                "kind": g.kind,
                "size": g.size,
                "granule": g.granule,
                "kept": d.map.k if d is not None else g.size,
                "map": None if d is None else "select" if d.map.is_selection else "fold",
                "pinned": g.pinned,
                "approximate": g.lossy,
                "shuffled": g.shuffled,  # read in a channel shuffle's order: selected, never folded
                "producers": g.modules(),
                "consumers": list(dict.fromkeys(s.fact.module for s in g.consumers)),
                "carriers": sorted({c.module for c in g.carriers}),
                "recon_error_plain": _mean([f.recon_error_plain for f in slot_folds]),
                "recon_error_grail": _mean(
                    [f.recon_error_plain if f.refused else f.recon_error_grail for f in slot_folds]
                ),
                "compensation_refused": sum(f.refused for f in slot_folds),
                "solver_fallbacks": sum(f.fallback is not None for f in slot_folds),
                "calibration_rows": max((rows or {}).get(s.key, 0) for s in g.consumers) if g.consumers else 0,
            }
        )
    return records


def summary(report: dict) -> str:
    """A short table of what changed."""
    rows = [
        ("parameters", f"{report['params_before']:,}", f"{report['params_after']:,}"),
        ("MACs / sample", f"{report['macs_before']:,}", f"{report['macs_after']:,}"),
    ]
    lat = report.get("latency_ms", {})
    if lat:
        rows.append(("PyTorch latency (ms)", f"{lat['before']:.2f}", f"{lat['after']:.2f}"))
    groups = report["groups"]
    pruned = [g for g in groups if g["kept"] < g["size"]]
    pinned = [g for g in groups if g["pinned"]]
    lines = [f"{'':24}{'before':>16}{'after':>16}"]
    lines += [f"{name:24}{a:>16}{b:>16}" for name, a, b in rows]
    lines.append(f"groups: {len(groups)} ({len(pruned)} pruned, {len(pinned)} pinned)")
    heads = [g for g in pruned if g["kind"] == "heads"]
    if heads:
        lines.append(f"attention: {sum(g['kept'] for g in heads)} of {sum(g['size'] for g in heads)} heads kept")
    lossy = [g for g in pruned if g.get("approximate")]
    if lossy:
        lines.append(f"approximate (normalisation over pruned channels): {len(lossy)} groups")
    plain = _mean([g["recon_error_plain"] for g in pruned])
    grail = _mean([g["recon_error_grail"] for g in pruned])
    if plain is not None:
        text = f"mean reconstruction error: plain {plain:.4f}"
        lines.append(text + (f", compensated {grail:.4f}" if grail is not None else " (no compensation)"))
    writers, few = report.get("stream_writers", []), report.get("stream_writers_few_rows", [])
    if writers or few:
        what = ("rebuild the dense stream (their errors include its drift)" if grail is not None
                else "have their errors measured against the dense stream (nothing compensates)")
        lines.append(f"stream target: {len(writers)} consumers adding into a residual stream {what}"
                     + (f"; {len(few)} kept the input target (too few calibration rows per kept channel)" if few
                        else ""))
    taps, few = report.get("kernel_taps", []), report.get("kernel_taps_few_rows", [])
    if taps or few:
        lines.append(f"kernel taps: {len(taps)} k x k convolution consumers solved over (channel, tap) pairs"
                     + (f"; {len(few)} over channels (too few calibration positions per kept pair)" if few
                        else ""))
    repair = report.get("repair")
    if repair:
        lines.append(f"repair: {repair['batch_norms']} BatchNorms re-estimated (means moved "
                     f"{repair['mean_shift_in_std']:.3f} std, std x {repair['std_ratio']:.3f} on average)"
                     if repair["batch_norms"] else f"repair: {repair['note']}")
    block = report.get("cpu_block")
    if block and block["not_multiple_after"] > block["not_multiple_before"]:
        lines.append(f"CPU speed: {block['not_multiple_after']} of {block['convs']} convolutions have widths that "
                     f"are not a multiple of {block['block']} (dense: {block['not_multiple_before']}), which ONNX "
                     f"Runtime's CPU runs outside its blocked layout; --multiple-of {block['block']} rounds every "
                     "kept width")
    out = report.get("output_error")
    if out:
        text = f"held-out output error: {out['relative_l2']:.4f} relative L2"
        if "top1_agreement" in out:
            text += f", top-1 agreement {100 * out['top1_agreement']:.1f}%"
        lines.append(text)
    onnx = report.get("onnx")
    if onnx:
        lines.append(f"ONNX ({onnx['provider']}): max |ORT - PyTorch| = {onnx['max_abs_diff']:.2e}")
    if report.get("data_free"):
        lines.append("calibration: data-free (random Gaussian inputs)")
    return "\n".join(lines)
