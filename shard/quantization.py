"""4-bit weights for small steps: the linear layers of a 4-bit checkpoint run on its own 4-bit values.

Why: one decode step of one sequence multiplies a single row by every weight,
so it is bound by reading the weights from memory. Here a bf16 linear streams
about 11 GB/s of weights; torch's int4 weight-only kernel
(``_weight_int4pack_mm_for_cpu``) reads a quarter of the bytes and is 3-5x
faster at 1-4 rows, but slower than bf16 from about 16 rows on (measured on this
machine: 576x1536, 1 row 28 vs 154 us, 64 rows 654 vs 220 us). So each linear
keeps both: int4 for steps of at most ``max_rows`` tokens, bf16 above.

The int4 values are recovered from the loaded weights: a GGUF Q4_0/Q4_1 block
of 32 weights is ``scale * q + offset`` with q in 0..15, so the group's min and
max give back scale, offset and every q exactly. A layer whose groups do not sit
on such a grid (another quantization, or full-precision weights) is left alone
unless int4 is forced with ``QUANTIZE=int4``, which quantizes it (lossy).

Precision: the kernel dequantizes in bf16, so an int4 step's weights differ from
the checkpoint's by about 1.6x what rounding them to bf16 does (mean 2.8e-4 vs
1.7e-4 on SmolLM2's layers). Trade-off, documented for users: a request's step runs on int4 or on bf16 weights
depending on how many tokens the step holds, and the two round differently, so
tokens are identical across batch compositions only up to that rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

GROUP = 32
MODES = ("auto", "int4", "none")
#: Largest step (tokens) that uses the int4 kernel; measured crossover is 12-16 rows.
DEFAULT_MAX_ROWS = 8
#: A layer is "on a 4-bit grid" when every weight is within this fraction of a step of its level.
#: bf16 rounding of a grid value moves it by at most ~0.12 of a step (15 steps span the group,
#: 2^-8 relative error); weights off any grid put some of thousands of groups near 0.5.
GRID_TOLERANCE = 0.25
#: Two int4 planes beat the bf16 head up to about 4 rows (576x49152: 1 row 1.9 vs 4.7 ms,
#: 4 rows 3.2 vs 4.2 ms, 8 rows 7.0 vs 4.8 ms).
HEAD_MAX_ROWS = 4


@dataclass(frozen=True)
class Int4Plane:
    packed: torch.Tensor  # torch's CPU int4 pack of q, [N, K/2] uint8
    scales_zeros: torch.Tensor  # [K/GROUP, N, 2]: w = (q - 8) * scale + zero


@dataclass(frozen=True)
class Int4Weight:
    """A weight as a sum of int4 planes: one for 4-bit values, two for 8-bit ones."""

    planes: tuple[Int4Plane, ...]
    #: Largest |w - dequantized| over the layer, relative to its group's step; 0 on an exact grid.
    grid_error: float


def _plane(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> Int4Plane:
    """q: [N, K/GROUP, GROUP] in 0..15; scale, zero: [N, K/GROUP]."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(q.shape[0], -1), 1)
    return Int4Plane(packed, torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous())


def _groups(weight: torch.Tensor) -> torch.Tensor:
    out_features, in_features = weight.shape
    return weight.detach().float().reshape(out_features, in_features // GROUP, GROUP)


def quantize_int4(weight: torch.Tensor, dtype: torch.dtype) -> Int4Weight:
    """Asymmetric 4-bit, groups of 32 along the input dimension; weight is [out, in]."""
    w = _groups(weight)
    low, high = w.amin(-1), w.amax(-1)
    step = (high - low) / 15
    step = torch.where(step > 0, step, torch.ones_like(step))  # constant groups: q = 0 everywhere
    levels = (w - low[..., None]) / step[..., None]
    q = levels.round().clamp(0, 15)
    # The kernel computes (q - 8) * scale + zero.
    return Int4Weight((_plane(q, step, low + 8 * step, dtype),), float((levels - q).abs().max()))


def quantize_int8_planes(weight: torch.Tensor, dtype: torch.dtype) -> Int4Weight:
    """Symmetric 8-bit in groups of 32 (GGUF's Q8_0: w = d * q, q in -127..127) as two int4 planes.

    With u = q + 128 = 16 * hi + lo: w = (hi - 8) * 16d + (lo - 8) * d + 8d, i.e. a
    plane of the high nibbles (scale 16d, zero 0) plus one of the low nibbles
    (scale d, zero 8d). torch has no fast int8 kernel with per-group scales, and
    per-row int8 would coarsen the file's per-group precision.
    """
    w = _groups(weight)
    d = w.abs().amax(-1) / 127
    d = torch.where(d > 0, d, torch.ones_like(d))
    levels = w / d[..., None]
    q = levels.round().clamp(-127, 127)
    u = (q + 128).to(torch.int32)
    high = _plane(u >> 4, 16 * d, torch.zeros_like(d), dtype)
    low = _plane(u & 15, d, 8 * d, dtype)
    return Int4Weight((high, low), float((levels - q).abs().max()))


class DualLinear(nn.Module):
    """A linear layer with int4-plane weights for small steps and its original weights for the rest."""

    def __init__(self, linear: nn.Linear, weight: Int4Weight, max_rows: int):
        super().__init__()
        self.linear = linear
        self.planes = len(weight.planes)
        for i, plane in enumerate(weight.planes):
            self.register_buffer(f"packed{i}", plane.packed, persistent=False)
            self.register_buffer(f"scales_zeros{i}", plane.scales_zeros, persistent=False)
        self.max_rows = max_rows

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight (e.g. for its dtype)
        return self.linear.weight

    def _times_plane(self, x: torch.Tensor, i: int) -> torch.Tensor:
        packed, scales_zeros = self.get_buffer(f"packed{i}"), self.get_buffer(f"scales_zeros{i}")
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > self.max_rows:
            return self.linear(x)
        flat = x.reshape(rows, x.shape[-1]).to(self.get_buffer("scales_zeros0").dtype)
        y = self._times_plane(flat, 0)
        for i in range(1, self.planes):
            y = y + self._times_plane(flat, i)
        if self.linear.bias is not None:
            y = y + self.linear.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def quantize_model(
    model: nn.Module, mode: str, dtype: torch.dtype, head_is_q8_0: bool = False, max_rows: int = DEFAULT_MAX_ROWS
) -> int:
    """Wraps the decoder's linear layers in ``DualLinear``; returns how many were wrapped.

    ``auto``: only layers whose weights already sit on a 4-bit grid (a 4-bit
    checkpoint), so the model's values do not change. ``int4``: every layer
    (lossy for full-precision checkpoints). The output head gets two 4-bit planes
    (its 8-bit values) when the checkpoint stores it as Q8_0 (``head_is_q8_0``,
    from the GGUF header: bf16 weights cannot tell an 8-bit grid apart), for steps
    of up to HEAD_MAX_ROWS tokens; otherwise it is left alone.
    """
    if mode not in MODES:
        raise ValueError(f"QUANTIZE must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return 0
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    wrapped, skipped = 0, 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.in_features % GROUP:
                continue
            if child is output:
                if head_is_q8_0:
                    setattr(parent, name, DualLinear(child, quantize_int8_planes(child.weight, dtype), HEAD_MAX_ROWS))
                    log.info("output head: its Q8_0 values as two int4 planes for steps of <= %d", HEAD_MAX_ROWS)
                continue
            int4 = quantize_int4(child.weight, dtype)
            if mode == "auto" and int4.grid_error > GRID_TOLERANCE:
                skipped += 1
                continue
            setattr(parent, name, DualLinear(child, int4, max_rows))
            wrapped += 1
    log.info(
        "int4 weights for steps of <= %d tokens: %d linear layers (%d not on a 4-bit grid, kept)",
        max_rows,
        wrapped,
        skipped,
    )
    return wrapped


def wants_int4(mode: str, dtype: torch.dtype, device: torch.device, world_size: int) -> bool:
    """Whether to try: CPU, one shard, and not fp32 (fp32 is asked for to reproduce transformers exactly)."""
    if mode == "none" or device.type != "cpu" or world_size > 1:
        return False
    return mode == "int4" or dtype != torch.float32
