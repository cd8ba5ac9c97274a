"""Loading a transformers causal LM with our paged attention plugged in."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.distributed import DistributedConfig

from common.model_source import ModelSource
from shard.loading.gguf_blocks import UnsupportedType
from shard.loading.gguf_storage import NotDirectlyLoadable, check_types, gguf_linear_storage, load_direct
from shard.numerics import attention
from shard.numerics.decoder_layers import make_decoder_layers_fast
from shard.numerics.invariant_experts import make_experts_invariant
from shard.numerics.invariant_linear import embed_as_tiles, make_linears_invariant
from shard.numerics.quantization import plan_storage, wants_quantized
from shard.numerics.sharded_linear import make_sharded_linears_invariant
from shard.numerics.shared_input import fuse_shared_inputs

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


def load_model(
    source: ModelSource, dtype: torch.dtype, device: torch.device, world_size: int = 1, quantize: str = "none"
) -> PreTrainedModel:
    """The model with our paged attention; split across ``world_size`` ranks by its tensor-parallel plan.

    Tensor parallelism uses transformers' own plans (``tp_plan="auto"``), so any
    architecture that ships one can be sharded; torch.distributed must already
    be initialised. ``quantize`` (auto, int4, none): see ``shard.numerics.quantization``.
    """
    log.info("loading %s (%s) on %s, rank 1/%d of the weights", source.display_name, dtype, device, world_size)
    # A GGUF file's own blocks (before transformers would expand a type we refuse to floats).
    reader = gguf_reader(source) if source.gguf_file and wants_quantized(quantize) else None
    config = AutoConfig.from_pretrained(source.path_or_id, **source.pretrained_kwargs())
    if not getattr(config, "is_decoder", True) or getattr(config, "is_encoder_decoder", False):
        raise SystemExit(f"{source.display_name} is not a decoder-only causal LM")
    extra: dict = {}
    if world_size > 1:
        _check_shardable(config, source, world_size)
        extra["distributed_config"] = DistributedConfig(tp_size=world_size, tp_plan="auto")
    direct = reader is not None and device.type == "cpu" and world_size == 1
    model, gguf_blocks = _gguf_direct(config, dtype, reader) if direct else (None, None)  # type: ignore[arg-type]
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            source.path_or_id,
            **source.pretrained_kwargs(),
            dtype=dtype,
            attn_implementation=attention.register(),
            **extra,
        )
    if world_size == 1 and gguf_blocks is None:  # a direct GGUF load is on the CPU already, partly meta
        model.to(device)  # type: ignore[arg-type,call-arg]
    model.eval()
    model.requires_grad_(False)
    if device.type == "cpu" and world_size == 1:
        # q/k/v and gate/up as one product each (columns are independent: no change of
        # numbers), then every linear on the step-invariant kernel (shard.numerics.invariant_linear),
        # a GGUF file's layers stored as its own blocks (shard.loading.gguf_storage), another 4-bit
        # checkpoint's on their own grid (shard.numerics.quantization).
        if reader is not None and gguf_blocks is None:  # loaded by transformers: blocks checked against it
            gguf_blocks = gguf_linear_storage(model, reader)
        fuse_shared_inputs(model, gguf_blocks)
        plan = plan_storage(model, quantize, dtype, decided=gguf_blocks)
        make_linears_invariant(model, plan)
        if gguf_blocks is not None:
            embed_as_tiles(model, gguf_blocks)  # the token table too stays in its blocks
        make_experts_invariant(model)
        make_decoder_layers_fast(model)  # the same layer in fewer calls (shard.numerics.decoder_layers)
    elif device.type == "cpu":
        make_sharded_linears_invariant(model)  # tensor parallel: the rule is in shard.numerics.sharded_linear
    return model


def _gguf_direct(config, dtype: torch.dtype, reader: gguf.GGUFReader):  # type: ignore[no-untyped-def]
    """The model built on the meta device and filled from the GGUF file, its quantized layers as
    blocks (shard.loading.gguf_storage.load_direct); (None, None) for a file that is not one tensor per
    parameter (transformers then loads it, de-quantized)."""
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed, not loaded
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention.register())
    model.tie_weights()  # a tied head shares the embedding's parameter, as from_pretrained leaves it
    try:
        return model, load_direct(model, reader, dtype)
    except NotDirectlyLoadable as error:
        log.info("%s: transformers loads this file (%s)", type(model).__name__, error)
        return None, None


def gguf_reader(source: ModelSource) -> gguf.GGUFReader:
    """The model's GGUF file, its tensor types checked: the start stops, naming the type, on one
    that is not served as it is."""
    reader = gguf.GGUFReader(Path(source.path_or_id) / source.gguf_file)  # type: ignore[operator]
    try:
        check_types(reader)
    except UnsupportedType as error:
        raise SystemExit(f"{source.display_name}: {error}; QUANTIZE=none serves it de-quantized") from error
    return reader


def _check_shardable(config, source: ModelSource, world_size: int) -> None:  # type: ignore[no-untyped-def]
    text = config.get_text_config()
    if source.gguf_file:
        raise SystemExit("tensor parallelism needs safetensors weights; GGUF models run with NUM_SHARD=1")
    if not getattr(text, "base_model_tp_plan", None):
        raise SystemExit(f"{type(config).__name__} has no tensor-parallel plan in transformers: use NUM_SHARD=1")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % world_size or kv_heads % world_size:
        raise SystemExit(f"NUM_SHARD={world_size} must divide the attention heads ({heads}) and KV heads ({kv_heads})")
