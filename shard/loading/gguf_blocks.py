"""GGUF quantized blocks re-encoded, losslessly, as the kernel's (q, scale, offset) groups.

Every GGUF type served here de-quantizes a weight as ``scale * q + offset`` for an
integer q and a per-group scale and offset that are themselves exact fp32 numbers
(float16 fields, times small integers for the k-quants' sub-block scales). So a
block is re-encoded as such groups without losing a bit, and the kernel's single
``fma(q, scale, offset)`` gives exactly the float32 weight of GGUF's reference
de-quantization (the ``gguf`` package's): q * scale is exact in fp32 (few enough
significant bits, checked by ``QuantizedWeight``), so fusing the multiply into the
add rounds once where the reference rounds once too.

| GGUF type | value (reference) | stored as |
|---|---|---|
| Q4_0 | d (q - 8) | 4-bit q, scale d, offset -8d (per 32) |
| Q4_1 | d q + m | 4-bit q, scale d, offset m |
| Q5_0 | d (q - 16) | 8-bit q - 16, scale d |
| Q5_1 | d q + m | 8-bit q, scale d, offset m |
| Q8_0 | d q | 8-bit q, scale d |
| Q4_K | (d sc) q - (dmin m) | 4-bit q, scale d sc, offset dmin (-m) (per 32) |
| Q5_K | (d sc) q - (dmin m) | 5-bit q, scale d sc, offset dmin (-m) (per 32) |
| Q6_K | (d sc) (q - 32) | 6-bit q, scale d sc, offset (-32 d) sc (per 16) |

The k-quants keep their factors as the file has them (``KQuantFactors``: float16 d and m
per 256 weights, 8-bit multipliers per group), and their values in 4, 5 or 6 bits: the
kernel computes each group's scale and offset as it reads it.

Other quantized types (Q2_K, Q3_K, IQ*, TQ*, ...) are ``UnsupportedType``: the
loader refuses them by name rather than expanding them to floats.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from shard.numerics.quantization import SUPER_BLOCK, KQuantFactors, QuantizedWeight

#: Types stored as they are (see the table above); float types need no decoding.
SUPPORTED = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)


class UnsupportedType(ValueError):
    """A quantized GGUF type this server does not store as it is."""


def _halves(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 fields: [..., 2] bytes -> [...] float16."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def _f16(raw: np.ndarray) -> np.ndarray:
    """Float16 fields as float32 (exactly)."""
    return _halves(raw).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2n] values: the n low nibbles, then the n high ones (GGUF's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: [..., 4] bytes -> [..., 32]: bit j of the little-endian word is weight j's 5th bit."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> the 8 sub-blocks' 6-bit scales and 6-bit mins (uint8).

    Bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; scales and mins 4-7 take their
    low 4 bits from bytes 8-11 and their high 2 bits from the top of bytes 0-3 / 4-7."""
    a, b, c = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    scales = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return scales, mins


Groups = tuple[np.ndarray, np.ndarray, np.ndarray, "Factors | None"]
#: A k-quant's factors per block: d, m ([..., blocks] float16), sc, mc ([..., blocks, groups] int8).
Factors = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _q4_0(b: np.ndarray) -> Groups:
    d = _f16(b[..., 0:2])
    return _nibbles(b[..., 2:18]), d[..., None], (-8 * d)[..., None], None


def _q4_1(b: np.ndarray) -> Groups:
    return _nibbles(b[..., 4:20]), _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None], None


def _q5(low: np.ndarray, qh: np.ndarray) -> np.ndarray:
    return _nibbles(low) | (_high_bits(qh) << 4)


def _q5_0(b: np.ndarray) -> Groups:
    d = _f16(b[..., 0:2])[..., None]
    return _q5(b[..., 6:22], b[..., 2:6]).astype(np.int8) - 16, d, np.zeros_like(d), None


def _q5_1(b: np.ndarray) -> Groups:
    return _q5(b[..., 8:24], b[..., 4:8]), _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None], None


def _q8_0(b: np.ndarray) -> Groups:
    d = _f16(b[..., 0:2])[..., None]
    return np.ascontiguousarray(b[..., 2:34]).view(np.int8), d, np.zeros_like(d), None


def _products(d: np.ndarray, m: np.ndarray, sc: np.ndarray, mc: np.ndarray) -> tuple[np.ndarray, np.ndarray, Factors]:
    """Scales d * sc and offsets m * mc ([..., groups] float32, exact), and those factors."""
    scale = d.astype(np.float32)[..., None] * sc.astype(np.float32)
    offset = m.astype(np.float32)[..., None] * mc.astype(np.float32)
    return scale, offset, (d, m, sc.astype(np.int8), mc.astype(np.int8))


def _k_quant_groups(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, Factors]:
    """Q4_K/Q5_K: the 8 sub-blocks' scale d * sc and offset dmin * (-m)."""
    sc, m = _k_scales(b[..., 4:16])
    return _products(_halves(b[..., 0:2]), _halves(b[..., 2:4]), sc, -m.astype(np.int16))


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 values: per 32-byte chunk c, sub-block 2c is its low nibbles, 2c + 1 its high."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)
    return _nibbles(chunks).reshape(*qs.shape[:-1], SUPER_BLOCK)


def _q4_k(b: np.ndarray) -> Groups:
    scale, offset, factors = _k_quant_groups(b)
    return _k_low_nibbles(b[..., 16:144]), scale, offset, factors


def _q5_k(b: np.ndarray) -> Groups:
    scale, offset, factors = _k_quant_groups(b)
    qh = b[..., 16:48]  # bit s of byte j: the 5th bit of weight j of sub-block s
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    q = _k_low_nibbles(b[..., 48:176]) | (high.reshape(*qh.shape[:-1], SUPER_BLOCK) << 4)
    return q, scale, offset, factors


def _q6_k(b: np.ndarray) -> Groups:
    """Two halves of 128 weights: ql's 64 bytes give 4 rows of 32 (low nibbles of bytes 0-31,
    of 32-63, high nibbles of 0-31, of 32-63), qh's 32 bytes their top 2 bits (shifts 0, 2, 4, 6).
    The values stay unsigned (0..63): the -32 goes into the offset, (-32 d) * sc."""
    lead = b.shape[:-1]
    ql = b[..., 0:128].reshape(*lead, 2, 2, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-2)  # [.., half, 4 rows, 32]
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3  # [.., half, 4 rows, 32]
    q = (low | (high << 4)).reshape(*lead, SUPER_BLOCK)
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8)
    d = _halves(b[..., 208:210])
    m = (d.astype(np.float32) * -32).astype(np.float16)
    if not np.array_equal(m.astype(np.float32), d.astype(np.float32) * -32):
        raise ValueError("a Q6_K scale too large for float16 times 32")
    return (q, *_products(d, m, sc, sc))


#: type -> (decoder, weights per block, bytes per block, stored bits, group, bits of the largest |q|)
_FORMATS = {
    T.Q4_0: (_q4_0, 32, 18, 4, 32, 4),
    T.Q4_1: (_q4_1, 32, 20, 4, 32, 4),
    T.Q5_0: (_q5_0, 32, 22, 8, 32, 5),
    T.Q5_1: (_q5_1, 32, 24, 8, 32, 5),
    T.Q8_0: (_q8_0, 32, 34, 8, 32, 8),
    T.Q4_K: (_q4_k, 256, 144, 4, 32, 4),
    T.Q5_K: (_q5_k, 256, 176, 5, 32, 5),
    T.Q6_K: (_q6_k, 256, 210, 6, 16, 6),
}


def check_supported(qtype: T, tensor_name: str) -> None:
    """UnsupportedType naming the type and the tensor, for quantized types not in SUPPORTED."""
    if qtype not in SUPPORTED and qtype not in FLOAT_TYPES:
        names = ", ".join(t.name for t in SUPPORTED)
        raise UnsupportedType(
            f"GGUF tensor {tensor_name} is {qtype.name}, which this server does not serve as it is "
            f"(supported quantizations: {names}; float types F32, F16, BF16)"
        )


def decode(data: np.ndarray, qtype: T, shape: tuple[int, int]) -> QuantizedWeight:
    """A 2-d GGUF tensor's raw blocks ([rows, bytes per row] uint8) as kernel groups.

    ``shape`` is (rows, columns) of the weight, i.e. (out_features, in_features)."""
    if qtype not in _FORMATS:
        raise UnsupportedType(f"{qtype.name} blocks cannot be decoded")
    decoder, per_block, block_bytes, bits, group, q_bits = _FORMATS[qtype]
    rows, columns = shape
    if columns % per_block or data.size != rows * columns // per_block * block_bytes:
        raise ValueError(f"{qtype.name} data of {data.size} bytes does not hold a {rows}x{columns} weight")
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows, columns // per_block, block_bytes)
    q, scale, offset, factors = decoder(blocks)
    return QuantizedWeight(
        bits,
        torch.from_numpy(np.ascontiguousarray(q.reshape(rows, columns)).astype(np.int8, copy=False)),
        _tensor(scale, rows),
        _tensor(offset, rows),
        0.0,
        group=group,
        q_bits=q_bits,
        factors=None if factors is None else KQuantFactors(*(_tensor(f, rows) for f in factors)),
    )


def _tensor(array: np.ndarray, rows: int) -> torch.Tensor:
    """[rows, blocks, ...] -> [rows, blocks * ...], contiguous, dtype kept."""
    return torch.from_numpy(np.ascontiguousarray(array.reshape(rows, -1)))
