"""``grailc bench OUT/`` and ``grailc compress --bench``: which two ONNX files are measured, and where the figures go.

The compressed model is ``OUT/model.onnx``. The dense model is ``OUT/dense.onnx``, which ``compress --bench``
writes from the very graph it compressed, through the same export and ONNX optimisation, and checks against
PyTorch like ``model.onnx``: both files then differ only by what compression changed, so their ratio is the speed-up
compression gave. For an output folder written without ``--bench``, ``--dense MODEL`` names the model that was
compressed (as for ``compress``: .pt2, torchvision:NAME, hf:FOLDER, ...): it is exported the same way, checked to
be that model (same MACs as the report's ``macs_before``) and kept as ``OUT/dense.onnx``. ``--dense FILE.onnx``
measures a dense ONNX file exactly as given. The figures go into ``OUT/report.json`` under ``bench``, written
atomically.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from grailc.bench import Settings, compare, providers, table
from grailc.errors import GrailcError
from grailc.outputs import atomic_write_text
from grailc.recipe import ExportSpec

DENSE = "dense.onnx"
COMPRESSED = "model.onnx"


def add_settings_arguments(parser) -> None:
    """The measuring flags of ``grailc bench``."""
    d = Settings()
    parser.add_argument("--batch", type=int, nargs="+", default=list(d.batches),
                        help="batch sizes: latency at 1, throughput at a larger one "
                        f"(default {' '.join(map(str, d.batches))})")
    parser.add_argument("--repeats", type=int, default=d.repeats,
                        help=f"timed runs of each model (default {d.repeats})")
    parser.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed runs first (default {d.warmup})")
    parser.add_argument("--max-seconds", type=float, default=d.max_seconds,
                        help=f"stop a configuration after this long, with at least 5 runs (default {d.max_seconds:g})")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: one per physical core)")
    parser.add_argument("--provider", default=d.provider, choices=["auto", "cpu", "cuda", "tensorrt"],
                        help="execution provider; auto: CUDA and TensorRT on a GPU, else CPU (default auto)")


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure the dense and the compressed ONNX models side by side with ONNX Runtime "
                       "and write the speed-ups into OUT/report.json")
    b.add_argument("out", help="an output folder of grailc compress (model.onnx, report.json)")
    b.add_argument("--dense", help="the dense model, when OUT has no dense.onnx: the MODEL given to compress "
                   "(hf:FOLDER too; exported the same way and kept as OUT/dense.onnx) or a .onnx file (measured as "
                   "given)")
    b.add_argument("--weights", help="state dict for --dense torchvision:NAME / timm:NAME")
    b.add_argument("--trust-pickle", action="store_true", help="allow unpickling a full module for --dense (runs code)")
    add_settings_arguments(b)
    b.add_argument("--quiet", action="store_true", help="print nothing but errors")
    b.add_argument("--debug", action="store_true", help="show tracebacks")


def settings_from(args) -> Settings:
    for name in ("repeats", "warmup"):
        if getattr(args, name, 1) < (1 if name == "repeats" else 0):
            raise GrailcError(f"--{name} must be {'positive' if name == 'repeats' else 'zero or more'}")
    batches = tuple(getattr(args, "batch", None) or Settings().batches)
    if any(b < 1 for b in batches):
        raise GrailcError(f"--batch must be positive, got {' '.join(map(str, batches))}")
    if (getattr(args, "threads", None) or 0) < 0:
        raise GrailcError(f"--threads must be zero (ONNX Runtime's default) or more, got {args.threads}")
    if not getattr(args, "max_seconds", Settings.max_seconds) > 0:
        raise GrailcError(f"--max-seconds must be positive, got {args.max_seconds:g}",
                          fix="give the seconds after which a configuration stops (it still runs 5 times)")
    return Settings(batches=batches, repeats=getattr(args, "repeats", Settings.repeats),
                    warmup=getattr(args, "warmup", Settings.warmup),
                    max_seconds=getattr(args, "max_seconds", Settings.max_seconds),
                    threads=getattr(args, "threads", None), provider=getattr(args, "provider", "auto"))


def check_compress_flags(args, recipe) -> None:
    """Refuse ``compress --bench`` up front where nothing could be measured, before the compile runs."""
    if getattr(args, "stream", False):
        raise GrailcError("--bench measures the ONNX models, which --stream does not write",
                          fix="drop --bench; `grailc export OUT/` writes the ONNX model afterwards, on a machine "
                              "that holds the compressed model")
    if not recipe.export.onnx:
        raise GrailcError("--bench measures the ONNX models, but --no-onnx (or the recipe) turns the export off",
                          fix="drop --no-onnx, or drop --bench")


def _sample_shapes(report: dict) -> list[list[int]] | None:
    """One sample's shape per input: the recipe's input shape, or a decoder LM's token ids ([1, macs_tokens])."""
    shape = (report.get("recipe") or {}).get("input_shape")
    if not shape:
        return [[1, report["macs_tokens"]]] if report.get("macs_tokens") else None
    return shape if isinstance(shape[0], list) else [shape]


def measure(dense: Path, compressed: Path, report: dict, settings: Settings, log=None) -> dict:
    """The ``bench`` record: the two files measured side by side, with the ideal speed-up from the report's MACs."""
    before, after = report.get("macs_before"), report.get("macs_after")
    ideal = before / after if before and after else None
    record = compare(dense, compressed, settings, _sample_shapes(report), ideal, log)
    record["macs_before"], record["macs_after"] = before, after
    if report.get("macs_tokens"):
        record["tokens"] = report["macs_tokens"]
    record["dense"], record["compressed"] = dense.name, compressed.name
    return record


def write_dense(module, example, path: Path, batches, tol: float) -> dict:
    """Export the dense ``module`` to ``path`` exactly as compress exports the compressed one, and check it."""
    from grailc.export import onnx_parity, reexport, save_onnx

    save_onnx(reexport(module, example), example, path, fix="compress without --bench, or use --dense FILE.onnx")
    parity = onnx_parity(path, module, batches)
    if not parity["relative_diff"] <= tol:
        raise GrailcError(f"the dense ONNX model differs from PyTorch by {parity['relative_diff']:.3g} relative "
                          f"(> {tol:g})", where=str(path), fix="report it; measure with --dense FILE.onnx meanwhile")
    return parity


def bench_into(result, staged, settings: Settings, log=None) -> dict:
    """``compress --bench``: write dense.onnx beside model.onnx in the staging folder, measure both, and rewrite
    report.json there (the folder is committed, all files at once, afterwards)."""
    report = result.report
    if "path" not in (report.get("onnx") or {}):
        raise GrailcError("--bench measures the ONNX models, but no model.onnx was written"
                          + (f" ({report['onnx']['skipped']})" if (report.get("onnx") or {}).get("skipped") else ""),
                          fix="drop --no-onnx, or drop --bench")
    tol = report["onnx"].get("tolerance", result.recipe.export.parity_tol)
    dense = staged.path(DENSE)
    parity = write_dense(result.reference, result.example, dense, result.held_out or [result.example], tol)
    record = measure(dense, staged.path(COMPRESSED), report, settings, log)
    record["dense_onnx"] = {k: parity[k] for k in ("max_abs_diff", "relative_diff", "opset", "nodes")}
    report["bench"] = record
    atomic_write_text(staged.path("report.json"), json.dumps(report, indent=2, default=str))
    return record


def run_bench(args) -> int:
    """``grailc bench OUT/``."""
    folder = Path(args.out)
    report_path, compressed = folder / "report.json", folder / COMPRESSED
    for path, fix in ((report_path, "give an output folder of grailc compress"),
                      (compressed, "compress without --no-onnx (model.onnx is what is measured)")):
        if not path.is_file():
            raise GrailcError(f"no {path.name} in the folder", where=str(folder), fix=fix)
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as e:
        raise GrailcError(f"cannot read report.json ({e})", where=str(report_path),
                          fix="re-run grailc compress to write it again") from e
    if report.get("failure"):
        raise GrailcError(f"this compile failed ({report['failure']}); there is no model to measure",
                          where=str(folder), fix="fix the compile first")
    settings = settings_from(args)
    providers(settings.provider)  # a provider that cannot run here is refused before --dense is exported
    dense = _dense_onnx(folder, report, args)
    log = None if args.quiet else print
    if log:
        log(f"measuring {dense} against {compressed} ({settings.repeats} runs each, interleaved)")
    record = measure(dense, compressed, report, settings, log)
    report["bench"] = record
    atomic_write_text(report_path, json.dumps(report, indent=2, default=str))
    if log:
        log(table(record))
        log(f"wrote the figures into {report_path} (bench)")
    return 0


def _dense_onnx(folder: Path, report: dict, args) -> Path:
    if not args.dense:
        if (folder / DENSE).is_file():
            return folder / DENSE
        raise GrailcError(f"the folder has no {DENSE} to compare with", where=str(folder),
                          fix="compress with --bench (it writes dense.onnx), or give --dense MODEL, the model you "
                          "compressed")
    if args.dense.endswith(".onnx"):
        if not Path(args.dense).is_file():
            raise GrailcError("no such file", where=args.dense, fix="give the dense model's ONNX file")
        return Path(args.dense)
    if args.dense.startswith("hf:"):
        return _export_dense_decoder(folder, report, args.dense)
    return _export_dense(folder, report, args)


def _not_the_source(dense: str, macs: int, before: int, unit: str) -> GrailcError:
    return GrailcError(f"--dense {dense} has {macs:,} MACs per {unit} but the compressed model's source had "
                       f"{before:,}: it is not the model that was compressed",
                       fix="give the MODEL (and --weights) that grailc compress was given")


def _export_dense_decoder(folder: Path, report: dict, dense: str) -> Path:
    """--dense hf:MODEL for the output of compress hf:MODEL: its decoder exported as ``grailc export`` exports it
    (token ids -> logits, checked against PyTorch, renamed into place), checked to be the source (the report's MACs
    per sequence of ``macs_tokens`` tokens), kept as OUT/dense.onnx (with its external data file, if any)."""
    from grailc.llm.commands import model_folder
    from grailc.llm.export import decoder_macs
    from grailc.llm.export_command import export_into, sample_ids
    from grailc.llm.hf import load_causal_lm

    if not report.get("macs_tokens"):
        raise GrailcError(f"--dense {dense} is a decoder LLM, but this folder holds no compressed decoder "
                          "(report.json has no macs_tokens)", where=str(folder),
                          fix="give the MODEL that grailc compress was given")
    model, _ = load_causal_lm(model_folder(dense))
    macs = decoder_macs(model, report["macs_tokens"])
    if report.get("macs_before") and macs != report["macs_before"]:
        raise _not_the_source(dense, macs, report["macs_before"], f"sequence of {report['macs_tokens']} tokens")
    export_into(folder, model, sample_ids(model, 64), force=True, name=DENSE)  # OUT had no dense.onnx
    return folder / DENSE


def _export_dense(folder: Path, report: dict, args) -> Path:
    """Export --dense MODEL as compress would have, check it is the compressed model's source, keep it in OUT."""
    from grailc.loading import load_model
    from grailc.metrics import count_macs
    from grailc.trace import capture

    if report.get("macs_tokens"):
        raise GrailcError(f"this folder holds a compressed decoder LLM, and --dense {args.dense} is not one",
                          where=str(folder), fix="give --dense hf:MODEL, the model grailc compress was given")
    shapes = _sample_shapes(report)
    if not shapes:
        raise GrailcError("report.json holds no recipe.input_shape", where=str(folder),
                          fix="re-run grailc compress, or use --dense FILE.onnx")
    loaded = load_model(args.dense, weights=args.weights, trust_pickle=args.trust_pickle)
    model = loaded.exported if loaded.exported is not None else loaded.module
    try:
        gm, example = capture(model, [tuple(s) for s in shapes])
    except GrailcError as e:  # its advice names --input-shape, which bench takes from the report
        raise GrailcError(f"--dense {args.dense} does not run on the compressed model's input shape "
                          f"{shapes}: it is not the model that was compressed ({e.what})",
                          fix="give the MODEL (and --weights) that grailc compress was given") from e
    macs = count_macs(gm, example)
    if report.get("macs_before") and macs != report["macs_before"]:
        raise _not_the_source(args.dense, macs, report["macs_before"], "sample")
    tol = (report.get("onnx") or {}).get("tolerance") or ExportSpec().parity_tol
    tmp = folder / f".{DENSE}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write_dense(gm, example, tmp, [example], tol)
        os.replace(tmp, folder / DENSE)
    finally:
        if tmp.exists():
            tmp.unlink()
    return folder / DENSE


__all__ = ["add_parser", "bench_into", "measure", "run_bench", "write_dense"]
