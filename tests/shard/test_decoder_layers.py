"""Llama-family decoder layers in the fused form (shard.numerics.decoder_layers): same computation, fewer calls."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from shard.numerics.decoder_layers import FastDecoderLayer, layer_ops, make_decoder_layers_fast
from support.tiny_models import TINY_CONFIGS

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_is_transformers_bit_for_bit(dtype):
    """In place on a strided view (q's columns of the fused q/k/v product), as the layer uses it."""
    ops = layer_ops()
    assert ops is not None
    config = TINY_CONFIGS["llama"]
    tokens, heads, dim = 37, 4, 16
    rotary = LlamaRotaryEmbedding(config.__class__(**{**config.to_dict(), "head_dim": dim}))
    positions = torch.arange(100, 100 + tokens)[None]
    fused = torch.randn(tokens, heads * dim + 40).to(dtype)
    q = fused[:, : heads * dim]
    cos, sin = rotary(fused[None], positions)
    expected, _ = apply_rotary_pos_emb(
        q.reshape(1, tokens, heads, dim).transpose(1, 2), q.reshape(1, tokens, heads, dim).transpose(1, 2), cos, sin
    )
    untouched = fused[:, heads * dim :].clone()
    ops.rotary(q, heads, dim, cos[0].contiguous(), sin[0].contiguous())
    assert torch.equal(q.view(tokens, heads, dim), expected[0].transpose(0, 1))
    assert torch.equal(fused[:, heads * dim :], untouched)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 1536, 33])
def test_silu_mul_matches_torch_and_ignores_other_rows(dtype, width):
    """On the two halves of a fused gate/up product, strided rows, as the layer calls it; large
    arguments of both signs (the exponential's range ends) included."""
    ops = layer_ops()
    assert ops is not None
    product = (torch.randn(23, 2 * width + 8) * 4).to(dtype)[:, 4 : 4 + 2 * width]  # rows 2 * width + 8 apart
    product[0, :4] = torch.tensor([-100.0, 100.0, -0.0, 1e-30])
    ours = ops.silu_mul(product, width)
    want = torch.nn.functional.silu(product[:, :width]) * product[:, width:]
    tolerance = {} if dtype == torch.bfloat16 else {"atol": 1e-6, "rtol": 1e-6}
    torch.testing.assert_close(ours, want, **tolerance)
    for row in (0, 11, 22):  # a row alone: the same bits as among the others
        assert torch.equal(ops.silu_mul(product[row : row + 1], width), ours[row : row + 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 576, 33])
def test_rms_norm_matches_transformers_and_ignores_other_rows(dtype, width):
    ops = layer_ops()
    assert ops is not None
    norm = LlamaRMSNorm(width, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = (torch.randn(19, width) * 3).to(dtype)
    ours = ops.rms_norm(x, norm.weight, norm.variance_epsilon)
    tolerance = {} if dtype == torch.bfloat16 else {"atol": 1e-6, "rtol": 1e-6}
    torch.testing.assert_close(ours, norm(x), **tolerance)
    for row in (0, 7, 18):  # a row alone: the same bits as among the others
        assert torch.equal(ops.rms_norm(x[row : row + 1], norm.weight, norm.variance_epsilon), ours[row : row + 1])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "mixtral"])
def test_llama_family_layers_are_replaced_and_others_left_alone(kind):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[kind], dtype=torch.float32)
    replaced = make_decoder_layers_fast(model)
    layers = model.model.layers
    if kind == "mixtral":  # experts in place of the MLP: transformers' own layer
        assert replaced == 0 and not any(isinstance(layer, FastDecoderLayer) for layer in layers)
    else:
        assert replaced == len(layers) and all(isinstance(layer, FastDecoderLayer) for layer in layers)
    if kind == "mistral":
        assert layers[0].window == TINY_CONFIGS["mistral"].sliding_window
