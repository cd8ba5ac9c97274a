"""Tiny llama-shaped GGUF files written at test time, each linear in a chosen GGUF type.

The tokenizer, chat template and the rest of the metadata are SmolLM2's (copied from the
embedded default model's file); the shape is small, with the 256-wide inputs k-quants
need. Types the ``gguf`` package quantizes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are quantized
from random normal weights; k-quants (which it only de-quantizes) are random blocks
whose float16 scales are set so the weights span about +-0.5: every bit of their
layout is exercised, and transformers de-quantizes them with the same reference code.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from support.tiny_models import SMOLLM

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2

#: Every stored type, spread over the layers: q/k/v of layer 0 apart (Q4_K beside Q6_K: not
#: fused), layer 1's alike (fused as 8-bit values).
MIXED_TYPES: dict[str, T] = {
    "blk.0.attn_q": T.Q4_K, "blk.0.attn_k": T.Q4_K, "blk.0.attn_v": T.Q6_K, "blk.0.attn_output": T.Q5_K,
    "blk.0.ffn_gate": T.Q4_0, "blk.0.ffn_up": T.Q4_0, "blk.0.ffn_down": T.Q6_K,
    "blk.1.attn_q": T.Q5_0, "blk.1.attn_k": T.Q5_0, "blk.1.attn_v": T.Q5_0, "blk.1.attn_output": T.Q8_0,
    "blk.1.ffn_gate": T.Q5_1, "blk.1.ffn_up": T.Q5_1, "blk.1.ffn_down": T.Q4_1,
    "output": T.Q6_K, "token_embd": T.Q8_0,
}  # fmt: skip

#: Largest |d| (and dmin) of random k-quant blocks: weights within about +-0.5.
_K_SCALES = {T.Q4_K: (0.5 / (63 * 15), 0.25 / 63), T.Q5_K: (0.5 / (63 * 31), 0.25 / 63), T.Q6_K: (0.5 / (127 * 32), 0)}
_SHAPE_KEYS = {
    "llama.block_count": LAYERS,
    "llama.embedding_length": HIDDEN,
    "llama.feed_forward_length": INTERMEDIATE,
    "llama.attention.head_count": HEADS,
    "llama.attention.head_count_kv": KV_HEADS,
    "llama.rope.dimension_count": HIDDEN // HEADS,
    "llama.context_length": 2048,
}


def _random_k_blocks(qtype: T, rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, bytes] of random blocks with small float16 d (and dmin) fields."""
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, columns // per_block, block_bytes), dtype=np.uint8)
    d_max, dmin_max = _K_SCALES[qtype]
    where = (block_bytes - 2,) if qtype == T.Q6_K else (0, 2)
    for offset, limit in zip(where, (d_max, dmin_max), strict=False):
        values = (rng.uniform(0.25, 1.0, blocks.shape[:2]) * limit).astype(np.float16)
        blocks[..., offset : offset + 2] = values.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


#: Types the ``gguf`` package quantizes.
_QUANTIZABLE = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)


def quantized_tensor(qtype: T, rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """A weight in ``qtype``: quantized from normal weights, random k-quant blocks, or (any other
    type, for refusal tests) random bytes."""
    if qtype in _K_SCALES:
        return _random_k_blocks(qtype, rows, columns, rng)
    weights = rng.normal(0.0, 0.2, (rows, columns)).astype(np.float32)
    if qtype == T.F32:
        return weights
    if qtype in _QUANTIZABLE:
        return gguf.quants.quantize(weights, qtype)
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 256, (rows, columns // per_block * block_bytes), dtype=np.uint8)


def _linear_shapes() -> dict[str, tuple[int, int]]:
    head_dim = HIDDEN // HEADS
    shapes = {"output": (49152, HIDDEN), "token_embd": (49152, HIDDEN)}
    for layer in range(LAYERS):
        shapes |= {
            f"blk.{layer}.attn_q": (HIDDEN, HIDDEN),
            f"blk.{layer}.attn_k": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{layer}.attn_v": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{layer}.attn_output": (HIDDEN, HIDDEN),
            f"blk.{layer}.ffn_gate": (INTERMEDIATE, HIDDEN),
            f"blk.{layer}.ffn_up": (INTERMEDIATE, HIDDEN),
            f"blk.{layer}.ffn_down": (HIDDEN, INTERMEDIATE),
        }
    return shapes


def _copy_metadata(writer: gguf.GGUFWriter) -> None:
    """SmolLM2's metadata (tokenizer, template, ...) with this file's shape."""
    reader = gguf.GGUFReader(Path(SMOLLM.path_or_id) / str(SMOLLM.gguf_file))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = _SHAPE_KEYS.get(key, field.contents())
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)


def build_tiny_gguf(folder: Path, types: dict[str, T] | None = None, seed: int = 0, tied: bool = False) -> Path:
    """Writes ``folder``/tiny.gguf: each linear (GGUF name without ``.weight``) in ``types``' type
    (MIXED_TYPES by default; F32 where not named), norms in F32; ``tied``: no ``output`` tensor
    (the head is the token table). Returns the file's path."""
    types = MIXED_TYPES if types is None else types
    rng = np.random.default_rng(seed)
    path = folder / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    _copy_metadata(writer)
    for name, (rows, columns) in _linear_shapes().items():
        if tied and name == "output":
            continue
        qtype = types.get(name, T.F32)
        data = quantized_tensor(qtype, rows, columns, rng)
        writer.add_tensor(f"{name}.weight", data, raw_dtype=None if qtype == T.F32 else qtype)
    for layer in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
