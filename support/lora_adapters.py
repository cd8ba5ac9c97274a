"""PEFT LoRA adapters with random, non-zero weights for the tiny models and the default model:
what the LoRA tests and the benchmark serve (no adapter can be downloaded here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

#: Every projection of a Llama-family decoder layer; Mixtral's experts are not adapted.
DENSE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_adapter(
    base: str | Path, folder: Path, seed: int, rank: int = 8, targets: list[str] | None = None,
    rslora: bool = False, gguf_file: str | None = None, alpha: int = 16,
) -> Path:  # fmt: skip
    """Saves a random LoRA adapter for the model at ``base`` into ``folder``."""
    torch.manual_seed(seed)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kwargs)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets or DENSE, use_rslora=rslora, init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # B is random too (PEFT's default starts it at zero: no change at all)
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(str(folder))
    return folder


def peft_generate(
    base: str | Path, adapter: Path | None, prompt: list[int], new_tokens: int, gguf_file: str | None = None
) -> list[int]:
    """transformers + PEFT's own greedy generate, float32: the oracle."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa", **kwargs)
    model.eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()
