"""Tiny random-weight models built at test time, with SmolLM2's real tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from common.model_source import resolve_model

SMOLLM = resolve_model(None)
_VOCAB = 49152  # SmolLM2's tokenizer

_COMMON: dict[str, Any] = dict(
    vocab_size=_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)

TINY_CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(**_COMMON),
    "qwen2": Qwen2Config(**_COMMON),
    # A window shorter than the test prompts, so that sliding-window masking is exercised.
    "mistral": MistralConfig(**_COMMON, sliding_window=24),
    "mixtral": MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
}


def smollm_tokenizer():
    return AutoTokenizer.from_pretrained(SMOLLM.path_or_id, **SMOLLM.pretrained_kwargs())


def build_tiny_model(kind: str, folder: Path, seed: int = 0) -> Path:
    """Saves a random-weight ``kind`` model with SmolLM2's tokenizer into ``folder``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[kind], dtype=torch.float32)
    # Larger-than-default weights make logits less flat, so greedy ties are rare.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=2, bos_token_id=1)
    model.save_pretrained(folder)
    smollm_tokenizer().save_pretrained(folder)
    return folder
