"""The step-invariant linear kernel: a row's output never depends on the rows around it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from shard.numerics.invariant_linear import InvariantLinear, linear_kernel, make_linears_invariant


def _layer(
    in_features: int, out_features: int, dtype: torch.dtype, bias: bool, seed: int
) -> tuple[nn.Linear, InvariantLinear]:
    torch.manual_seed(seed)
    plain = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    kernel = linear_kernel()
    assert kernel is not None
    return plain, InvariantLinear(plain, kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (64, 100), (7, 3)])
def test_matches_torch_linear(dtype, shape):
    plain, layer = _layer(*shape, dtype=dtype, bias=True, seed=0)
    x = torch.randn(37, shape[0]).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer(x).float(), plain(x).float(), atol=tolerance, rtol=tolerance)
    assert layer(x).dtype == dtype and layer.weight.is_meta and layer.weight.shape == plain.weight.shape


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 70),
    position=st.integers(0, 69),
    threads=st.sampled_from([1, 2, 3]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    width=st.sampled_from([(96, 200), (33, 17)]),
)
def test_a_row_is_the_same_bits_in_any_batch(rows, position, threads, dtype, width):
    """Any row count, any place among the rows, any thread count: bit-identical."""
    _, layer = _layer(*width, dtype=dtype, bias=True, seed=1)
    probe = torch.randn(1, width[0], generator=torch.Generator().manual_seed(7)).to(dtype)
    alone = layer(probe)
    others = torch.randn(rows, width[0]).to(dtype)
    where = position % (rows + 1)
    batch = torch.cat([others[:where], probe, others[where:]])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(layer(batch)[where : where + 1], alone)
    finally:
        torch.set_num_threads(previous)


def test_every_plain_linear_is_replaced():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4, bias=False)))
    assert make_linears_invariant(model) == 2
    assert isinstance(model[0], InvariantLinear) and isinstance(model[2][0], InvariantLinear)
    assert model(torch.randn(5, 8)).shape == (5, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 7, 40])
def test_a_residual_added_as_results_are_stored_is_the_same_bits_as_after(dtype, rows):
    _, layer = _layer(96, 200, dtype=dtype, bias=True, seed=3)
    x = torch.randn(rows, 96).to(dtype)
    residual = (torch.randn(rows, 200) * 10).to(dtype)
    assert torch.equal(layer.plus(x, residual), residual + layer(x))
    assert torch.equal(layer.plus(x, residual.float()), residual.float() + layer(x))  # another dtype: added after
