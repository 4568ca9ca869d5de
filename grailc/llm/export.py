"""ONNX export of a (compressed) decoder LM: token ids [batch, seq] -> logits, no KV cache, batch and sequence
axes dynamic, checked against PyTorch with ONNX Runtime. Models over 2 GB keep their weights in an external data
file beside the .onnx (``model.onnx.data``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.export import Dim

from grailc.errors import GrailcError

EXTERNAL_DATA_BYTES = 2 * 1024**3
LLM_ONNX_OPSET = 20  # see export_decoder_onnx


class LogitsOnly(torch.nn.Module):
    """ids -> logits of a Hugging Face causal LM, without the KV cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits


def export_decoder_onnx(model, ids: torch.Tensor, path, tol: float = 1e-3) -> dict:
    """Write ``path`` and compare ONNX Runtime's logits with PyTorch's on ``ids`` and on a shorter prefix."""
    from grailc.errors import VerificationError
    from grailc.export import onnx_parity, save_onnx
    from grailc.trace import _quiet_torch

    path = Path(path)
    wrapper = LogitsOnly(model).eval()
    ids = ids.to(torch.long)
    if ids.shape[0] < 2:
        ids = ids.repeat(2, 1)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    try:
        with torch.no_grad(), _quiet_torch():
            program = torch.export.export(
                wrapper, (ids,), dynamic_shapes=({0: Dim("batch", min=1, max=1024), 1: Dim("seq", min=2, max=8192)},),
                strict=False)
    except Exception as e:  # the tracer's own message, shortened
        raise GrailcError(f"the decoder could not be traced for ONNX export: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:300]}", fix="rerun with --no-onnx") from e
    # opset 20: at 23 the exporter fuses rotary embeddings into a RotaryEmbedding node that ONNX Runtime 1.31
    # rejects for these shapes ("cos_cache and sin_cache are expected to have the same shape as input x")
    save_onnx(program, (ids,), path, external_data=external, fix="rerun with --no-onnx", opset=LLM_ONNX_OPSET)
    parity = onnx_parity(path, wrapper, [(ids,), (ids[:1, : max(2, ids.shape[1] // 2)],)])
    parity["external_data"] = external
    parity["tolerance"] = tol
    if not parity["relative_diff"] <= tol:
        raise VerificationError(f"ONNX Runtime logits differ from PyTorch by {parity['relative_diff']:.3g} "
                                f"(relative) > {tol:g}", fix="rerun with --no-onnx and report it")
    return parity


def decoder_macs(model, tokens: int) -> int:
    """Multiply-adds of one sequence of ``tokens`` through the exported decoder (no cache): every linear layer, the
    lm_head included, once per token, and per attention layer the scores q k^T and their use on v, tokens^2 times
    (query width + value width), each heads x head_dim: o_proj's input width (q_proj may be fused into qkv_proj)."""
    from grailc.llm.layerwise import decoder_parts

    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = sum(2 * layer.self_attn.o_proj.in_features for layer in decoder_parts(model)[0])
    return linear * tokens + attention * tokens * tokens
