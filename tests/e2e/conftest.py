"""Fixtures shared by the decoder-LLM tests: SmolLM2's tokenizer and a tiny random LLaMA saved with it."""

from __future__ import annotations

import pytest
import torch

from grailc.llm.shipped import smollm2_folder


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder())


def save_tiny_llama(folder, tokenizer, *, tied: bool = True, seed: int = 0):
    """A 2-layer LLaMA (4 query / 2 KV heads of 16, MLP 96) with random weights and SmolLM2's tokenizer, saved in
    ``folder``; ``tied``: the head is the embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=tied)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    """The tiny LLaMA with a tied head."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer)
