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


@dataclass(frozen=True)
class Int4Weight:
    packed: torch.Tensor  # torch's CPU int4 pack of q, [N, K/2] uint8
    scales_zeros: torch.Tensor  # [K/GROUP, N, 2]: w = (q - 8) * scale + zero
    #: Largest |w - dequantized| over the layer, relative to its group's step; 0 on an exact grid.
    grid_error: float


def quantize_int4(weight: torch.Tensor, dtype: torch.dtype) -> Int4Weight:
    """Asymmetric 4-bit, groups of 32 along the input dimension; weight is [out, in]."""
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // GROUP, GROUP)
    low, high = w.amin(-1), w.amax(-1)
    step = (high - low) / 15
    step = torch.where(step > 0, step, torch.ones_like(step))  # constant groups: q = 0 everywhere
    levels = (w - low[..., None]) / step[..., None]
    q = levels.round().clamp(0, 15)
    grid_error = float((levels - q).abs().max())
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(out_features, -1), 1)
    zero = low + 8 * step  # the kernel computes (q - 8) * scale + zero
    scales_zeros = torch.stack([step.t(), zero.t()], dim=-1).to(dtype).contiguous()
    return Int4Weight(packed, scales_zeros, grid_error)


class DualLinear(nn.Module):
    """A linear layer with int4 weights for small steps and its original weights for the rest."""

    def __init__(self, linear: nn.Linear, int4: Int4Weight, max_rows: int):
        super().__init__()
        self.linear = linear
        self.packed: torch.Tensor
        self.scales_zeros: torch.Tensor
        self.register_buffer("packed", int4.packed, persistent=False)
        self.register_buffer("scales_zeros", int4.scales_zeros, persistent=False)
        self.max_rows = max_rows

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight (e.g. for its dtype)
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > self.max_rows:
            return self.linear(x)
        flat = x.reshape(rows, x.shape[-1]).to(self.scales_zeros.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_zeros)
        if self.linear.bias is not None:
            y = y + self.linear.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def quantize_model(model: nn.Module, mode: str, dtype: torch.dtype, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Wraps the decoder's linear layers in ``DualLinear``; returns how many were wrapped.

    ``auto``: only layers whose weights already sit on a 4-bit grid (a 4-bit
    checkpoint), so the model's values do not change. ``int4``: every layer
    (lossy for full-precision checkpoints). The output head is left alone: GGUF
    files keep it at 6 or 8 bits.
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
            if not isinstance(child, nn.Linear) or child is output or child.in_features % GROUP:
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
