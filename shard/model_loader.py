"""Loading a transformers causal LM with our paged attention plugged in."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from common.model_source import ModelSource
from shard import attention

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: where a bf16 forward beats fp32 on this CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    if requested:
        if requested not in DTYPES:
            raise SystemExit(f"DTYPE must be one of {sorted(DTYPES)}, got {requested!r}")
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    log.info("loading %s (%s) on %s", source.display_name, dtype, device)
    config = AutoConfig.from_pretrained(source.path_or_id, **source.pretrained_kwargs())
    if not getattr(config, "is_decoder", True) or getattr(config, "is_encoder_decoder", False):
        raise SystemExit(f"{source.display_name} is not a decoder-only causal LM")
    model = AutoModelForCausalLM.from_pretrained(
        source.path_or_id,
        **source.pretrained_kwargs(),
        dtype=dtype,
        attn_implementation=attention.register(),
    )
    model.to(device).eval()  # type: ignore[arg-type,call-arg]
    model.requires_grad_(False)
    return model
