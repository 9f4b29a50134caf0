"""Tiny models and batches shared by the tests (built from configs: nothing is downloaded)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 64


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32) -> transformers.LlamaForCausalLM:
    """A Llama of a few thousand parameters, initialised from ``seed``."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)
