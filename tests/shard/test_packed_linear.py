"""bf16 linear layers with oneDNN-prepacked weights (shard.packed_linear)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shard.packed_linear import PackedLinear, can_pack, pack_linears


def test_packed_layers_compute_what_the_plain_ones_did():
    if not can_pack(torch.bfloat16, torch.device("cpu"), 1):
        pytest.skip("oneDNN has no bf16 on this CPU")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False)).to(torch.bfloat16)
    plain = [model[0], model[2]]
    with torch.inference_mode():
        for rows in (1, 9, 64, 300):  # decode sizes and a prefill
            x = torch.randn(2, rows, 64).to(torch.bfloat16)
            want = model(x)
            assert pack_linears(model) in (0, 2)  # packs once; a second call finds nothing left to pack
            torch.testing.assert_close(model(x), want, atol=0, rtol=0)
    assert isinstance(model[0], PackedLinear) and model[0].weight.is_meta
    assert model[0].weight.shape == plain[0].weight.shape and model[2].bias is None


def test_only_bf16_cpu_single_shard_packs():
    assert not can_pack(torch.float32, torch.device("cpu"), 1)
    assert not can_pack(torch.bfloat16, torch.device("cpu"), 2)
    assert not can_pack(torch.bfloat16, torch.device("cuda"), 1)
