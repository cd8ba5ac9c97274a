"""int4 weights for small steps (shard.quantization)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shard.quantization import GROUP, DualLinear, Int4Weight, quantize_int4, quantize_int8_planes, quantize_model
from tests.models import SMOLLM


def _on_grid(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """A Q4_1-like weight: per group of 32, scale * q + offset with q in 0..15 (each group spans 0..15)."""
    q = torch.randint(0, 16, (out_features, in_features // GROUP, GROUP), generator=generator).float()
    q[..., 0], q[..., 1] = 0, 15
    scale = torch.rand(out_features, in_features // GROUP, 1, generator=generator) * 0.01 + 0.001
    offset = -8 * scale + torch.randn(out_features, in_features // GROUP, 1, generator=generator) * 0.002
    return (q * scale + offset).reshape(out_features, in_features)


def test_a_4bit_grid_is_recovered_exactly():
    weight = _on_grid(96, 128, torch.Generator().manual_seed(0))
    int4 = quantize_int4(weight, torch.float32)
    assert int4.grid_error < 1e-3
    # bf16 scales and bf16 arithmetic: within a few bf16 ulps of the weights' range.
    dequantized = _dequantize(quantize_int4(weight, torch.bfloat16), 128)
    torch.testing.assert_close(dequantized, weight, atol=weight.abs().max().item() / 64, rtol=0)


def test_an_8bit_grid_becomes_two_exact_planes():
    """GGUF Q8_0 (w = d * q, q in -127..127 per group of 32) as high and low nibble planes."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (64, 4, GROUP), generator=generator).float()
    q[..., 0] = 127  # the reference quantizer puts the group's largest magnitude at +-127
    d = torch.rand(64, 4, 1, generator=generator) * 0.01 + 0.001
    weight = (q * d).reshape(64, 128)
    planes = quantize_int8_planes(weight, torch.float32)
    assert len(planes.planes) == 2
    assert planes.grid_error < 1e-3
    torch.testing.assert_close(_dequantize(planes, 128, torch.float32), weight, atol=1e-6, rtol=0)


def _dequantize(weight: Int4Weight, in_features: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    eye = torch.eye(in_features, dtype=dtype)
    total = sum(
        torch.ops.aten._weight_int4pack_mm_for_cpu(eye, p.packed, GROUP, p.scales_zeros).float() for p in weight.planes
    )
    assert isinstance(total, torch.Tensor)
    return total.t()


def test_dual_linear_uses_int4_for_small_steps_only():
    generator = torch.Generator().manual_seed(1)
    linear = nn.Linear(128, 96, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(_on_grid(96, 128, generator))
    dual = DualLinear(linear, quantize_int4(linear.weight, torch.bfloat16), max_rows=4)
    small = torch.randn(1, 3, 128, generator=generator).to(torch.bfloat16)
    large = torch.randn(1, 9, 128, generator=generator).to(torch.bfloat16)
    assert torch.equal(dual(large), linear(large))  # above max_rows: the original layer, bit for bit
    torch.testing.assert_close(dual(small).float(), linear(small).float(), atol=0.05, rtol=0.02)


def test_auto_wraps_only_layers_on_a_grid():
    generator = torch.Generator().manual_seed(2)
    on_grid = nn.Linear(64, 64)
    with torch.no_grad():
        on_grid.weight.copy_(_on_grid(64, 64, generator))
    model = nn.Sequential(on_grid, nn.Linear(64, 64), nn.Linear(48, 8))  # [1]: full-precision random weights
    assert quantize_model(model, "auto", torch.float32) == 1
    assert isinstance(model[0], DualLinear)
    assert isinstance(model[1], nn.Linear)
    assert quantize_model(nn.Sequential(nn.Linear(64, 64), nn.Linear(48, 8)), "int4", torch.float32) == 1
    assert quantize_model(nn.Sequential(nn.Linear(64, 64)), "none", torch.float32) == 0
    with pytest.raises(ValueError, match="QUANTIZE"):
        quantize_model(model, "int3", torch.float32)


def test_smollm2_q4_1_runs_on_its_own_4bit_values():
    """The default model's GGUF is Q4_1 with a Q8_0 head: every decoder linear is on a grid and gets
    wrapped, the head gets two planes, and a one-token step stays within 2% of the bf16 layer."""
    from shard.model_loader import load_model

    model = load_model(SMOLLM, torch.bfloat16, torch.device("cpu"), quantize="auto")
    wrapped = [m for m in model.modules() if isinstance(m, DualLinear)]
    head = model.get_output_embeddings()
    assert isinstance(head, DualLinear) and head.planes == 2  # its Q8_0 values
    # Per layer: q/k/v fused, o, gate/up fused, down (shard.shared_input); and the head.
    assert len(wrapped) == 4 * model.config.num_hidden_layers + 1
    linear = wrapped[0].linear
    x = torch.randn(1, 1, linear.in_features).to(torch.bfloat16)
    relative = (wrapped[0](x).float() - linear(x).float()).norm() / linear(x).float().norm()
    assert relative < 0.02
    h = torch.randn(1, 1, head.linear.in_features).to(torch.bfloat16)
    want = head.linear(h).float()
    assert (head(h).float() - want).norm() / want.norm() < 0.02
