"""Quantized weight storage (shard.numerics.quantization) on the step-invariant kernel."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from shard.numerics.decoder_layers import FastDecoderLayer
from shard.numerics.invariant_linear import InvariantLinear, linear_kernel, make_linears_invariant
from shard.numerics.quantization import GROUP, exact_grid, plan_storage, quantize_int4, quantize_int8
from support.tiny_models import SMOLLM
from tests.shard.linear_steps import alone_and_in_step


def _on_grid(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """A Q4_1-like weight: per group of 32, scale * q + offset with q in 0..15 (each group spans 0..15)."""
    q = torch.randint(0, 16, (out_features, in_features // GROUP, GROUP), generator=generator).float()
    q[..., 0], q[..., 1] = 0, 15
    scale = torch.rand(out_features, in_features // GROUP, 1, generator=generator) * 0.01 + 0.001
    offset = -8 * scale + torch.randn(out_features, in_features // GROUP, 1, generator=generator) * 0.002
    return (q * scale + offset).reshape(out_features, in_features)


def _gguf_blocks(out_features: int, in_features: int, bits: int, generator: torch.Generator) -> torch.Tensor:
    """Weights as GGUF de-quantizes Q4_1 ((q * d) + m) or Q8_0 (d * q) blocks: float16 d and m, fp32 math."""
    shape = (out_features, in_features // GROUP, GROUP)
    if bits == 4:
        q = torch.randint(0, 16, shape, generator=generator).float()
        q[..., 0], q[..., 1] = 0, 15  # the reference quantizer maps the group's minimum to 0, its maximum to 15
    else:
        q = torch.randint(-127, 128, shape, generator=generator).float()
        q[..., 0] = 127
    d = (torch.rand(*shape[:2], 1, generator=generator) * 0.01 + 0.001).half().float()
    m = (torch.randn(*shape[:2], 1, generator=generator) * 0.05).half().float() if bits == 4 else 0.0
    return ((q * d) + m).reshape(out_features, in_features)


@pytest.mark.parametrize("bits", [4, 8])
def test_gguf_blocks_are_recovered_bit_for_bit(bits):
    weight = _gguf_blocks(96, 128, bits, torch.Generator().manual_seed(bits))
    grid = exact_grid(weight, bits)
    assert grid is not None and grid.bits == bits
    assert torch.equal(grid.dequantize(), weight)
    # Off the grid by one float32 ulp in one weight: no exact storage.
    nudged = weight.clone()
    nudged[5, 7] = torch.nextafter(nudged[5, 7], torch.tensor(1.0))
    assert exact_grid(nudged, bits) is None
    assert exact_grid(torch.randn(64, 64), bits) is None


def test_a_4bit_grid_is_recovered():
    weight = _on_grid(96, 128, torch.Generator().manual_seed(0))
    int4 = quantize_int4(weight)
    assert int4.grid_error < 1e-3
    torch.testing.assert_close(int4.dequantize(), weight, atol=1e-6, rtol=0)


def test_an_8bit_grid_is_recovered():
    """GGUF Q8_0: w = d * q, q in -127..127 per group of 32."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (64, 4, GROUP), generator=generator).float()
    q[..., 0] = 127  # the reference quantizer puts the group's largest magnitude at +-127
    d = torch.rand(64, 4, 1, generator=generator) * 0.01 + 0.001
    weight = (q * d).reshape(64, 128)
    int8 = quantize_int8(weight)
    assert int8.grid_error < 1e-3
    # The scale keeps 17 significant bits (q * scale exact in fp32): within 127 * 2^-17 of a step.
    torch.testing.assert_close(int8.dequantize(), weight, atol=127 * 0.011 * 2**-17, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_layers_compute_with_their_stored_values_at_every_step_size(bits, dtype):
    """The kernel unpacks the stored values (no size-dependent kernel): a row's output is the
    same bits alone or among others, and equals a plain layer holding the dequantized weights."""
    kernel = linear_kernel()
    assert kernel is not None
    generator = torch.Generator().manual_seed(bits)
    weight = _on_grid(80, 96, generator)  # 80 outputs: a partial last tile
    quantized = quantize_int4(weight) if bits == 4 else quantize_int8(weight)
    linear = nn.Linear(96, 80, bias=True)
    layer = InvariantLinear(linear, kernel, quantized)
    plain = nn.Linear(96, 80, bias=True)
    with torch.no_grad():
        plain.weight.copy_(quantized.dequantize())
        plain.bias.copy_(linear.bias)
    reference = InvariantLinear(plain, kernel)  # fp32 weights: exactly the dequantized values
    x = torch.randn(21, 96, generator=generator).to(dtype)
    y = layer(x)
    if dtype == torch.bfloat16 and kernel.bf16_dot:
        # bf16 products by VDPBF16PS, the group's scale and offset applied to its sums: the same
        # weights, products grouped otherwise than the fp32 layer's chain (within bf16 rounding).
        torch.testing.assert_close(y.float(), reference(x).float(), atol=1e-2, rtol=2**-7)
    else:
        assert torch.equal(y, reference(x))
    for i in range(x.shape[0]):
        assert torch.equal(layer(x[i : i + 1]), y[i : i + 1])


def test_auto_stores_only_layers_on_a_grid():
    generator = torch.Generator().manual_seed(2)
    on_grid = nn.Linear(64, 64)
    with torch.no_grad():
        on_grid.weight.copy_(_on_grid(64, 64, generator))
    gguf = nn.Linear(64, 64)
    with torch.no_grad():
        gguf.weight.copy_(_gguf_blocks(64, 64, 4, generator))
    model = nn.Sequential(on_grid, nn.Linear(64, 64), nn.Linear(48, 8), gguf)  # [1]: full-precision random weights
    assert set(plan_storage(model, "auto", torch.bfloat16)) == {"0", "3"}
    assert set(plan_storage(model, "auto", torch.float32)) == {"3"}  # float32: exact GGUF blocks only
    lossless = plan_storage(model, "int4", torch.float32)["3"]  # GGUF blocks, found exactly
    assert torch.equal(lossless.dequantize(), gguf.weight)
    assert set(plan_storage(model, "int4", torch.float32)) == {"0", "1", "3"}  # 48 inputs: not a multiple of 32
    assert plan_storage(model, "none", torch.bfloat16) == {}
    with pytest.raises(ValueError, match="QUANTIZE"):
        plan_storage(model, "int3", torch.float32)
    assert make_linears_invariant(model, plan_storage(model, "auto", torch.bfloat16)) == 4
    assert [m.storage for m in model] == ["int4", "float32", "float32", "int4"]  # type: ignore[union-attr]


def test_smollm2_q4_1_is_stored_on_its_own_4bit_values():
    """The default model's GGUF is Q4_1 with a Q8_0 head: every decoder linear is on a grid and is
    stored as 4-bit values, the head as 8-bit ones; outputs stay within 2% of the bf16 layers."""
    from shard.loading.model_loader import load_model

    model = load_model(SMOLLM, torch.bfloat16, torch.device("cpu"), quantize="auto")
    storage = [m.storage for m in model.modules() if isinstance(m, InvariantLinear)]
    head = model.get_output_embeddings()
    assert isinstance(head, InvariantLinear) and head.storage == "int8"
    # Its fused gate/up product feeds silu(gate) * up in one C call (shard.numerics.decoder_layers).
    fast = [m for m in model.modules() if isinstance(m, FastDecoderLayer)]
    assert len(fast) == model.config.num_hidden_layers
    assert all(m.silu_width == model.config.intermediate_size for m in fast)
    # Per layer: q/k/v fused, o, gate/up fused, down (shard.numerics.shared_input); and the head.
    assert storage.count("int4") == 4 * model.config.num_hidden_layers
    plain = load_model(SMOLLM, torch.bfloat16, torch.device("cpu"), quantize="none")
    x = torch.randn(3, plain.config.hidden_size).to(torch.bfloat16)
    want = plain.get_output_embeddings()(x).float()
    assert (head(x).float() - want).norm() / want.norm() < 0.02


def test_smollm2_int4_in_float32_is_lossless():
    """QUANTIZE=int4 in float32 stores the Q4_1 layers and the Q8_0 head as their GGUF blocks:
    every layer's output is bit for bit the de-quantized float32 layer's (transformers' weights)."""
    from shard.loading.model_loader import load_model

    stored = load_model(SMOLLM, torch.float32, torch.device("cpu"), quantize="int4")
    plain = load_model(SMOLLM, torch.float32, torch.device("cpu"), quantize="none")
    layers = dict(stored.named_modules())
    x = torch.randn(5, 1536, generator=torch.Generator().manual_seed(0))
    checked = 0
    for name, layer in plain.named_modules():
        if isinstance(layer, InvariantLinear):
            twin = layers[name]
            assert isinstance(twin, InvariantLinear) and twin.storage in ("int4", "int8")
            inputs = x[:, : layer.in_features]
            assert torch.equal(twin(inputs), layer(inputs)), name
            checked += 1
    assert checked == 4 * plain.config.num_hidden_layers + 1


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 20),
    position=st.integers(0, 19),
    threads=st.sampled_from([1, 2, 3]),
    storage=st.sampled_from(["float32", "bfloat16", "int4", "int8"]),
    out_features=st.sampled_from([16, 40, 80, 200]),
    activations=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_every_storage_gives_a_row_the_same_bits_in_any_batch(
    rows, position, threads, storage, out_features, activations
):
    """Steps of up to four rows unpack the weights in registers, several tiles at a time (with a
    shorter group at the end); larger steps unpack each tile into a buffer. Both must give a row
    the same bits, whatever the step: with fp32 activations, the bits of the dequantized weights'
    fp32 layer; with bf16 ones on AVX512-BF16 (VDPBF16PS), its values within bf16 rounding."""
    kernel = linear_kernel()
    generator = torch.Generator().manual_seed(out_features)
    weight = _on_grid(out_features, 96, generator)
    linear = nn.Linear(96, out_features, bias=True)
    if storage in ("int4", "int8"):
        quantized = quantize_int4(weight) if storage == "int4" else quantize_int8(weight)
        layer = InvariantLinear(linear, kernel, quantized)
        weight = quantized.dequantize()
    else:
        with torch.no_grad():
            linear.weight.copy_(weight)
        layer = InvariantLinear(linear.to(getattr(torch, storage)), kernel)
        weight = linear.weight.detach().float()
    plain = nn.Linear(96, out_features, bias=True)
    with torch.no_grad():
        plain.weight.copy_(weight)
        plain.bias.copy_(linear.bias.float())
    reference = InvariantLinear(plain, kernel)
    probe = torch.randn(1, 96, generator=generator).to(activations)
    others = torch.randn(rows, 96, generator=generator).to(activations)
    alone, in_step = alone_and_in_step(layer, probe, others, position % (rows + 1), threads)
    if activations == torch.bfloat16 and kernel.bf16_dot and storage != "float32":
        torch.testing.assert_close(alone.float(), reference(probe).float(), atol=1e-2, rtol=2**-7)
    else:
        assert torch.equal(alone, reference(probe))
    assert torch.equal(in_step, alone)


@pytest.mark.parametrize("storage", ["bfloat16", "int4", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 5, 40])
def test_bf16_activations_stay_within_bf16_rounding_of_the_exact_products(storage, rows):
    """bf16 activations (VDPBF16PS on AVX512-BF16, fp32 FMAs elsewhere) against float64 products of
    the very weights stored: off by the output's bf16 rounding and fp32 accumulation, no more."""
    kernel = linear_kernel()
    generator = torch.Generator().manual_seed(rows)
    weight = _on_grid(200, 576, generator)  # 7 tiles (a partial one), 18 groups
    linear = nn.Linear(576, 200, bias=True)
    if storage == "bfloat16":
        with torch.no_grad():
            linear.weight.copy_(weight)
        linear = linear.to(torch.bfloat16)
        layer, exact = InvariantLinear(linear, kernel), linear.weight.double()
    else:
        quantized = quantize_int4(weight) if storage == "int4" else quantize_int8(weight)
        layer, exact = InvariantLinear(linear, kernel, quantized), quantized.dequantize().double()
    x = torch.randn(rows, 576, generator=generator).to(torch.bfloat16)
    want = x.double() @ exact.T + linear.bias.double()
    magnitude = x.double().abs() @ exact.abs().T  # the scale of the rounding of a sum of products
    error = (layer(x).double() - want).abs()
    assert (error <= 2**-8 * want.abs() + 2**-20 * magnitude + 1e-6).all()
