"""Quantized weight storage: a 4-bit (or 8-bit) checkpoint's linears kept on their own grid.

Why: a decode step of a few sequences multiplies a few rows by every weight, so it
is bound by reading the weights from memory. Stored as 4-bit values with a scale
and an offset per group of 32, a layer reads about a quarter of its bf16 bytes.

Storage only, never a second path: the step-invariant kernel
(``shard/numerics/kernels/linear.c``) unpacks a quantized tile to fp32 (``(q * scale) +
offset``, as GGUF's own de-quantization) before any product, at
every step size, so a layer
computes with the same weight values whether the step holds one token or a
thousand. (Library int4 kernels are fast only at a few rows, which is why this
used to switch to bf16 weights above 8 tokens, and why a token's logits then
depended on the size of its step.)

The 4-bit values are recovered from the loaded weights: a GGUF Q4_0/Q4_1 block of
32 weights is ``scale * q + offset`` with q in 0..15, so the group's min and max
give back scale, offset and every q. ``QUANTIZE=auto`` stores a layer this way only
when its weights sit on such a grid (a 4-bit checkpoint), and the output head as
8-bit values when the GGUF file says it is Q8_0; ``int4`` quantizes every layer
(lossy for full-precision checkpoints); ``none`` keeps the loaded dtype.

In float32 a GGUF checkpoint's layers are stored as their blocks themselves where
these give back every loaded weight bit for bit (``exact_grid``: GGUF's scale and
offset are float16 numbers, found among the float16 neighbours of the group's span),
so the model computes exactly the float32 model transformers loads while a decode
step reads a fifth of the bytes. ``auto`` does this for exact blocks only (lossless);
``int4`` also quantizes the layers that have none. The kernel unpacks a few rows' weights
in registers, several tiles at a time (figures: docs/performance.md, "Quantized storage").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

log = logging.getLogger(__name__)

GROUP = 32
MODES = ("auto", "int4", "none")
#: A layer is "on a 4-bit grid" when every weight is within this fraction of a step of its level.
#: bf16 rounding of a grid value moves it by at most ~0.12 of a step (15 steps span the group,
#: 2^-8 relative error); weights off any grid put some of thousands of groups near 0.5.
GRID_TOLERANCE = 0.25


@dataclass(frozen=True)
class KQuantFactors:
    """A GGUF k-quant's scales and offsets as the file has them: per super-block of 256 weights a
    float16 d and m, per group an 8-bit multiplier of each; scale = d * sc, offset = m * mc, both
    exact in fp32. The kernel keeps only these (shard/numerics/kernels/linear.c, kquant_start)."""

    d: torch.Tensor  # [out, in / 256] float16
    m: torch.Tensor  # [out, in / 256] float16
    sc: torch.Tensor  # [out, in / group] int8
    mc: torch.Tensor  # [out, in / group] int8

    def expanded(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) [out, in / group] in float32."""
        per_super = SUPER_BLOCK // group
        scale = self.d.float().repeat_interleave(per_super, dim=1) * self.sc.float()
        offset = self.m.float().repeat_interleave(per_super, dim=1) * self.mc.float()
        return scale, offset

    def rows(self, index: torch.Tensor | slice) -> KQuantFactors:
        return KQuantFactors(self.d[index], self.m[index], self.sc[index], self.mc[index])


SUPER_BLOCK = 256
#: (bits, group, k-quant factors) the kernel stores: linear.c's INT4, INT8, INT8_G16, K4, K5, K6.
STORAGES = ((4, 32, False), (8, 32, False), (8, 16, False), (4, 32, True), (5, 32, True), (6, 16, True))


@dataclass(frozen=True)
class QuantizedWeight:
    """w[n, k] = (q[n, k] * scale[n, k // group]) + offset[n, k // group] in fp32.

    Invariant: every q * scale is exact in fp32 (a scale has at most ``scale_bits``
    significant bits), so the kernel's single fused multiply-add gives these bits."""

    bits: int  # 4: q in 0..15; 5, 6 (k-quants): 0..31, 0..63; 8: q in -128..127
    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out, in / group] float32
    offset: torch.Tensor  # [out, in / group] float32
    #: Largest |w - q level| over the layer, in steps of its group; 0 on an exact grid.
    grid_error: float
    #: Weights per (scale, offset): 32, or 16 (GGUF's Q6_K).
    group: int = GROUP
    #: Bits of the largest |q| the values may hold (None: 4 for 4-bit, 7 for 8-bit values).
    q_bits: int | None = None
    #: A k-quant's scale and offset factors (``scale``/``offset`` are their products).
    factors: KQuantFactors | None = None

    def __post_init__(self) -> None:
        if (self.bits, self.group, self.factors is not None) not in STORAGES:
            raise ValueError(f"no kernel storage for {self.bits}-bit values in groups of {self.group}")
        if bool((self.scale.float().contiguous().view(torch.int32) & _dropped_mask(self.scale_bits)).any()):
            raise ValueError(f"scales of {self.q_bits}-bit values must have at most {self.scale_bits} significant bits")
        if self.factors is not None:
            scale, offset = self.factors.expanded(self.group)
            if not (torch.equal(scale, self.scale) and torch.equal(offset, self.offset)):
                raise ValueError("k-quant factors must give the scales and offsets exactly")

    @property
    def scale_bits(self) -> int:
        """Significant bits a scale may have so that every q * scale is exact in fp32 (24 bits)."""
        return 24 - (self.q_bits or DEFAULT_Q_BITS[self.bits])

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the kernel computes with (for tests and checks)."""
        scale = self.scale.repeat_interleave(self.group, dim=1)
        offset = self.offset.repeat_interleave(self.group, dim=1)
        return torch.addcmul(offset, self.q.float(), scale)  # the product is exact: as the kernel's fma

    def rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The weight of these output rows, in this order."""
        factors = None if self.factors is None else self.factors.rows(index)
        return replace(self, q=self.q[index], scale=self.scale[index], offset=self.offset[index], factors=factors)

    def concatenated(self, others: list[QuantizedWeight]) -> QuantizedWeight:
        """This weight's rows followed by the others' (sibling projections fused into one layer)."""
        parts = [self, *others]
        if any(p.storage != self.storage for p in parts):
            raise ValueError("only weights of one storage concatenate")
        factors = None
        if self.factors is not None:
            f = [p.factors for p in parts]
            factors = KQuantFactors(*(torch.cat([getattr(x, n) for x in f]) for n in ("d", "m", "sc", "mc")))
        return QuantizedWeight(
            self.bits,
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.offset for p in parts]),
            max(p.grid_error for p in parts),
            group=self.group,
            q_bits=max(p.q_bits or DEFAULT_Q_BITS[p.bits] for p in parts),
            factors=factors,
        )

    @property
    def storage(self) -> tuple[int, int, bool]:
        """(bits, group, k-quant factors): weights of one storage share a kernel type."""
        return self.bits, self.group, self.factors is not None


#: Bits of the largest |q| unless a weight says otherwise: 4 bits (0..15), or 7 bits of
#: magnitude (-127..127), so that scales of 20 and 17 significant bits keep q * scale exact in
#: fp32 (24 bits). GGUF's float16 scales have 11.
DEFAULT_Q_BITS = {4: 4, 8: 7}
SCALE_BITS = {bits: 24 - q_bits for bits, q_bits in DEFAULT_Q_BITS.items()}


def _dropped_mask(scale_bits: int) -> int:
    """The fp32 mantissa bits a scale of ``scale_bits`` significant bits leaves zero."""
    return (1 << (24 - scale_bits)) - 1


def _exact_product_scale(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """scale rounded (to nearest, on the magnitude's bits) to SCALE_BITS[bits] significant bits."""
    mask = _dropped_mask(SCALE_BITS[bits])
    raw = scale.float().contiguous().view(torch.int32)
    return ((raw + (mask + 1) // 2) & ~mask).view(torch.float32)


def _groups(weight: torch.Tensor) -> torch.Tensor:
    out_features, in_features = weight.shape
    return weight.detach().float().reshape(out_features, in_features // GROUP, GROUP)


def quantize_int4(weight: torch.Tensor) -> QuantizedWeight:
    """Asymmetric 4-bit, groups of 32 along the input dimension; weight is [out, in]."""
    w = _groups(weight)
    low, high = w.amin(-1), w.amax(-1)
    step = (high - low) / 15
    step = torch.where(step > 0, step, torch.ones_like(step))  # constant groups: q = 0 everywhere
    step = _exact_product_scale(step, 4)
    levels = (w - low[..., None]) / step[..., None]
    q = levels.round().clamp(0, 15)
    error = float((levels - q).abs().max())
    return QuantizedWeight(4, q.to(torch.int8).reshape(weight.shape), step, low, error)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric 8-bit in groups of 32 (GGUF's Q8_0: w = d * q, q in -127..127)."""
    w = _groups(weight)
    d = w.abs().amax(-1) / 127
    d = _exact_product_scale(torch.where(d > 0, d, torch.ones_like(d)), 8)
    levels = w / d[..., None]
    q = levels.round().clamp(-127, 127)
    error = float((levels - q).abs().max())
    return QuantizedWeight(8, q.to(torch.int8).reshape(weight.shape), d, torch.zeros_like(d), error)


def exact_grid(weight: torch.Tensor, bits: int) -> QuantizedWeight | None:
    """The GGUF blocks (q, float16 scale, float16 offset) whose ``(q * scale) + offset``
    is every fp32 weight bit for bit (Q4_1 for 4 bits, Q8_0 for 8); None if any group has none.

    Q4_1's offset is the group's minimum (its q is 0) and Q8_0 has none; the scale is a
    float16 number within two float16 steps of the span over the levels.
    """
    w = _groups(weight)
    if bits == 4:
        offset, span, low, high = w.amin(-1), w.amax(-1) - w.amin(-1), 0, 15
    else:
        offset, span, low, high = torch.zeros_like(w[..., 0]), w.abs().amax(-1), -127, 127
    guess = (span / high).to(torch.float16).view(torch.int16)
    q_found = torch.zeros_like(w, dtype=torch.int8)
    scale_found = torch.ones_like(offset)
    found = torch.zeros(offset.shape, dtype=torch.bool)
    for ulps in (0, 1, -1, 2, -2):
        scale = (guess + ulps).view(torch.float16).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant groups: q = 0
        q = ((w - offset[..., None]) / scale[..., None]).round().clamp(low, high)
        exact = ((q * scale[..., None]) + offset[..., None] == w).all(-1) & ~found
        q_found[exact], scale_found[exact] = q[exact].to(torch.int8), scale[exact]
        found |= exact
    if not bool(found.all()):
        return None
    return QuantizedWeight(bits, q_found.reshape(weight.shape), scale_found, offset, 0.0)


def wants_quantized(mode: str) -> bool:
    """Whether to look for quantized storage at all (``none`` keeps the loaded dtype)."""
    if mode not in MODES:
        raise ValueError(f"QUANTIZE must be one of {MODES}, got {mode!r}")
    return mode != "none"


def _stored(weight: torch.Tensor, bits: int, dtype: torch.dtype, mode: str) -> QuantizedWeight | None:
    """In float32 the checkpoint's own blocks where they are exact (lossless; ``auto`` takes
    nothing else), else the recovered grid (whose ``grid_error`` says how far off it is)."""
    exact = exact_grid(weight, bits) if dtype == torch.float32 else None
    if exact is not None or (mode == "auto" and dtype == torch.float32):
        return exact
    return quantize_int4(weight) if bits == 4 else quantize_int8(weight)


def plan_storage(
    model: nn.Module, mode: str, dtype: torch.dtype, decided: dict[str, QuantizedWeight] | None = None
) -> dict[str, QuantizedWeight]:
    """Which linear layers (by qualified name) are stored quantized, and their values.

    ``decided``: layers whose storage is already known (a GGUF file's own blocks,
    ``shard.loading.gguf_storage``), kept as they are; ``auto`` adds nothing to them. Otherwise
    ``auto``: layers whose weights already sit on a 4-bit grid (in float32: exactly);
    ``int4``: every layer but the head. ``none``: nothing.
    """
    if not wants_quantized(mode):
        return {}
    plan: dict[str, QuantizedWeight] = dict(decided or {})
    if decided is not None and mode == "auto":
        return plan
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    skipped = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.in_features % GROUP or module is output or name in plan:
            continue
        weight = module.weight
        int4 = _stored(weight, 4, dtype, mode)
        if int4 is None or (mode == "auto" and int4.grid_error > GRID_TOLERANCE):
            skipped += 1
            continue
        plan[name] = int4
    log.info(
        "quantized storage: %d layers as 4-bit, %d as 8-bit (%d not on a 4-bit grid, kept as loaded)",
        sum(1 for w in plan.values() if w.bits == 4),
        sum(1 for w in plan.values() if w.bits == 8),
        skipped,
    )
    return plan
