"""Projections of one input fused into one matmul (shard.numerics.shared_input) give the model's own outputs."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from shard.numerics.shared_input import SharedInputSlice, fuse_shared_inputs
from support.tiny_models import TINY_CONFIGS


def _tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(TINY_CONFIGS[kind], dtype=torch.float32).eval()


def test_fused_llama_and_qwen2_compute_what_they_did():
    for kind in ("llama", "qwen2"):  # qwen2: q/k/v with biases
        model = _tiny(kind)
        ids = torch.randint(0, 1000, (2, 9))
        with torch.inference_mode():
            want = model(input_ids=ids).logits
            groups = fuse_shared_inputs(model)
            got = model(input_ids=ids).logits
        layers = TINY_CONFIGS[kind].num_hidden_layers
        assert groups == 2 * layers  # q/k/v and gate/up of every layer
        k_proj = model.model.layers[0].self_attn.k_proj
        assert isinstance(k_proj, SharedInputSlice)
        assert k_proj.weight.shape == (TINY_CONFIGS[kind].num_key_value_heads * 16, 64)  # heads x head_dim 16
        assert k_proj.weight.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_slice_called_with_another_input_recomputes():
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = nn.Linear(8, 4), nn.Linear(8, 2), nn.Linear(8, 2)
    reference = {name: getattr(parent, name) for name in ("q_proj", "k_proj", "v_proj")}
    assert fuse_shared_inputs(parent) == 1
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    with torch.inference_mode():
        torch.testing.assert_close(parent.q_proj(x), reference["q_proj"](x))
        torch.testing.assert_close(parent.k_proj(y), reference["k_proj"](y))  # not x: computed for y
        torch.testing.assert_close(parent.v_proj(x), reference["v_proj"](x))
        # A whole round on one input leaves nothing behind.
        z = torch.randn(3, 8)
        for name in ("q_proj", "k_proj", "v_proj"):
            torch.testing.assert_close(getattr(parent, name)(z), reference[name](z))
    assert parent.q_proj_k_proj_v_proj._pending.input is None


def test_projections_that_differ_are_left_alone():
    parent = nn.Module()
    parent.gate_proj, parent.up_proj = nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=True)
    assert fuse_shared_inputs(parent) == 0
    assert type(parent.gate_proj) is nn.Linear
