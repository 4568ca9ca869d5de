"""``grailc export OUT/``: the ONNX export of a compressed decoder LM's output folder, for a model compressed with
``--stream`` (which never holds the whole model, so writes no ONNX) or with ``--no-onnx``.

The folder is loaded as ``grailc ppl`` loads it (:func:`grailc.llm.hf.load_causal_lm`: per-layer widths through
``grailc_shapes.json``, safetensors only, ``trust_remote_code=False``), on the CPU, and exported as ``compress``
exports a decoder (:func:`grailc.llm.export.export_decoder_onnx`: token ids -> logits, external data above 2 GB,
ONNX Runtime parity against PyTorch), on a sample of ``--seq-len`` token ids drawn uniformly from the vocabulary
with a fixed seed (2 rows, so batch and sequence length both vary in the check).

Nothing already in OUT is changed until the export passed its check: the files are written into a hidden staging
folder inside OUT, then renamed into place (``model.onnx.data`` first when the weights are external, then
``model.onnx``), and ``report.json`` is rewritten atomically with the check's figures under ``onnx``. The weights
and every other file are only read. An existing ``model.onnx`` is replaced only with ``--force``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from grailc.errors import GrailcError, OutputExistsError, VerificationError

ONNX_FILE = "model.onnx"


def data_file(onnx_name: str) -> str:
    """torch.onnx.export's name for the external data of the ONNX file ``onnx_name``."""
    return onnx_name + ".data"


DATA_FILE = data_file(ONNX_FILE)
SAMPLE_SEED = 0
EPILOG = """exit codes: 0 ok, 2 bad input, 3 the ONNX model failed its check against PyTorch (nothing written),
4 internal error, 130 interrupted"""


def add_parser(sub) -> None:
    """The ``export`` subcommand."""
    e = sub.add_parser("export", help="export the output folder of grailc compress hf:... (e.g. with --stream) to "
                       "OUT/model.onnx, checked against PyTorch with ONNX Runtime, on the CPU", epilog=EPILOG)
    e.add_argument("out", help="an output folder of grailc compress hf:... (config.json, safetensors, report.json)")
    e.add_argument("--seq-len", type=int, default=64,
                   help="token ids per row of the sample the export is traced and checked on (default 64)")
    e.add_argument("--force", action="store_true", help="replace an existing OUT/model.onnx")
    e.add_argument("--quiet", action="store_true", help="print nothing but errors")
    e.add_argument("--debug", action="store_true", help="show tracebacks")


def run_export(args) -> int:
    from grailc.llm.hf import load_causal_lm

    start = time.perf_counter()
    folder = Path(args.out)
    if not 2 <= args.seq_len <= 8192:
        raise GrailcError(f"--seq-len {args.seq_len} is out of range", fix="give --seq-len N with 2 <= N <= 8192")
    report_path, report = check_folder(folder, args.force)
    model, _ = load_causal_lm(folder)  # float weights as compress had them; CPU
    check_dtype(model, folder)
    ids = sample_ids(model, args.seq_len)
    t0 = time.perf_counter()
    parity, written = export_into(folder, model, ids, args.force)
    report["onnx"] = {**parity, "path": ONNX_FILE, "exported_by": "grailc export",
                      "sample": f"{ids.shape[0]} x {ids.shape[1]} random token ids (seed {SAMPLE_SEED})"}
    report.setdefault("timings", {})["export"] = round(time.perf_counter() - t0, 3)
    from grailc.outputs import atomic_write_text

    try:
        atomic_write_text(report_path, json.dumps(report, indent=2, default=str))
    except GrailcError as e:
        raise GrailcError(f"{' and '.join(written)} written, but report.json could not be updated ({e.what})",
                          where=str(report_path),
                          fix="check that the folder is writable, then rerun with --force") from e
    if not args.quiet:
        print(f"wrote {folder / ONNX_FILE}" + (f" and {DATA_FILE}" if parity["external_data"] else "")
              + f": ONNX Runtime logits within {parity['relative_diff']:.2g} (relative) of PyTorch's, opset "
              f"{parity['opset']}; updated report.json (onnx) ({time.perf_counter() - start:.1f} s)")
    return 0


def check_folder(folder: Path, force: bool) -> tuple[Path, dict]:
    """Refuse, before the model is loaded, what is not an output folder of ``grailc compress hf:...`` and an
    ONNX file that --force does not allow to replace; returns report.json's path and content."""
    fix = "give the output folder of grailc compress hf:MODEL ... (--stream or --no-onnx)"
    if not folder.is_dir():
        raise GrailcError("no such folder", where=str(folder), fix=fix)
    if not (folder / "config.json").is_file():
        raise GrailcError("not the output folder of a decoder LM: no config.json", where=str(folder), fix=fix)
    if not any(folder.glob("*.safetensors")):
        raise GrailcError("no safetensors weights in the folder (grailc reads no pickles)", where=str(folder), fix=fix)
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise GrailcError("no report.json in the folder: not written by grailc compress", where=str(folder), fix=fix)
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as e:
        raise GrailcError(f"cannot read report.json ({e})", where=str(report_path),
                          fix="re-run grailc compress to write it again") from e
    if not isinstance(report, dict) or "layers" not in report:
        raise GrailcError("report.json is not that of a decoder LM compressed layer by layer", where=str(report_path),
                          fix=fix)
    if report.get("failure"):
        raise GrailcError(f"this compile failed ({report['failure']}); there is no model to export",
                          where=str(folder), fix="fix the compile first")
    present = [name for name in (ONNX_FILE, DATA_FILE) if os.path.lexists(folder / name)]
    if present and not force:
        one = len(present) == 1
        raise OutputExistsError(f"{' and '.join(present)} already exist{'s' if one else ''}; nothing was written",
                                where=str(folder), fix=f"pass --force to replace {'it' if one else 'them'}")
    return report_path, report


def check_dtype(model, folder: Path) -> None:
    from grailc.export import ONNX_UNSUPPORTED

    dtype = next(model.parameters()).dtype
    if dtype in ONNX_UNSUPPORTED:
        raise GrailcError(f"the model is {str(dtype).split('.')[1]}: {ONNX_UNSUPPORTED[dtype].split(';')[0]}",
                          where=str(folder), fix="the compressed folder is unchanged: load it with grailc ppl or "
                          "AutoModelForCausalLM")


def sample_ids(model, seq_len: int) -> torch.Tensor:
    """2 rows of ``seq_len`` token ids, uniform over the embedding's rows, from a fixed seed: the same every run."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    return torch.randint(0, vocab, (2, seq_len), generator=generator)


def export_into(folder: Path, model, ids: torch.Tensor, force: bool, name: str = ONNX_FILE) -> tuple[dict, list[str]]:
    """Export into a staging folder inside ``folder``, check, then rename the files into place as ``name`` (and
    ``name``.data, the external data, above 2 GB); returns the parity figures and the names written. Nothing in
    ``folder`` changes unless the check passed."""
    from grailc.llm.export import export_decoder_onnx
    from grailc.outputs import default_file_mode, fsync_tree

    try:
        staging = Path(tempfile.mkdtemp(prefix=".grailc-export-", dir=folder))
    except OSError as e:
        raise GrailcError(f"cannot create a staging folder ({e.strerror}); nothing was written", where=str(folder),
                          fix="check that the folder is writable") from e
    try:
        try:
            parity = export_decoder_onnx(model, ids, staging / name)
        except VerificationError as e:
            raise VerificationError(f"{e.what}; nothing was written", where=str(folder / name),
                                    fix="the compressed folder is unchanged; report it") from e
        except GrailcError as e:
            raise GrailcError(f"{e.what}; nothing was written", where=str(folder),
                              fix="the compressed folder is unchanged; report it") from e
        data = data_file(name)
        names = [data, name] if parity["external_data"] else [name]
        missing = [file for file in names if not (staging / file).is_file()]
        if missing:
            raise GrailcError(f"the ONNX export did not write {', '.join(missing)}; nothing was written",
                              where=str(folder), fix="report it")
        for file in names:
            (staging / file).chmod(default_file_mode())
        fsync_tree(staging)
        return parity, _move_into_place(staging, folder, names, force, data)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, folder: Path, names: list[str], force: bool, data: str) -> list[str]:
    """Rename ``names`` from the staging folder into ``folder`` in order (the external data before the model that
    reads it); under --force a stale external data file ``data`` the new model no longer uses is removed after."""
    from grailc.cli import note_written
    from grailc.outputs import fsync_dir

    moved: list[str] = []

    def so_far() -> str:
        return f"{' and '.join(moved)} written" if moved else "nothing was written"

    for name in names:
        target = folder / name
        if os.path.lexists(target) and not force:  # appeared while the export ran
            raise OutputExistsError(f"{name} appeared in the folder during the export; {so_far()}",
                                    where=str(folder), fix="pass --force to replace it")
        try:
            os.replace(staging / name, target)
        except OSError as e:
            raise GrailcError(f"cannot move {name} into place ({e.strerror}); {so_far()}", where=str(folder),
                              fix="check permissions and free space, then rerun with --force") from e
        moved.append(name)
        note_written(target)
    if data not in names and force:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / data)
    fsync_dir(folder)
    return moved
