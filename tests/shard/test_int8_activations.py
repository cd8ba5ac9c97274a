"""int8 activations (QUANTIZED_ACTIVATIONS, linear.c "int8 activations"): the kernel's products equal a
numpy reference of the documented arithmetic to the bit, a row's result does not depend on its
step, and the result stays close to the float products it replaces."""

from __future__ import annotations

import ctypes
import subprocess

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from shard.loading.gguf_blocks import decode
from shard.numerics.invariant_linear import INT8_ACTIVATIONS, InvariantLinear, linear_kernel, quantize_activations
from shard.numerics.quantization import QuantizedWeight
from support.gguf_files import quantized_tensor
from tests.shard.linear_steps import alone_and_in_step

#: The GGUF types whose storage takes the int8 path (4-, 5-, 6-bit unsigned values).
INT8_TYPES = (T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K)
COLUMNS = 512


def q8_reference(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear.c's int8-activation arithmetic in numpy float32, operation by operation."""
    rows = x.float().numpy()
    m, k = rows.shape
    blocks = rows.reshape(m, k // 32, 32)
    amax = np.abs(blocks).max(axis=-1)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    d = (amax / np.float32(127)).astype(np.float32)
    q8 = np.clip(np.rint(blocks * inverse[..., None]), -127, 127).astype(np.int64).reshape(m, k)
    group = weight.group
    groups = k // group
    q = weight.q.numpy().astype(np.int64).reshape(-1, groups, group)
    xq = q8.reshape(m, groups, group)
    products = np.einsum("mgj,ngj->mng", xq, q)  # exact integers
    sums = xq.sum(axis=-1)
    scale, offset = weight.scale.numpy(), weight.offset.numpy()
    acc = np.zeros((m, q.shape[0]), dtype=np.float32)
    for g in range(groups):
        t = products[:, :, g].astype(np.float32) * scale[None, :, g]
        u = sums[:, g, None].astype(np.float32) * offset[None, :, g]
        t = t + u
        t = d[:, g * group // 32, None] * t
        acc = acc + t
    if bias is not None:
        acc = acc + bias.numpy()
    return torch.from_numpy(acc)


def _weight(qtype: T, out_features: int, seed: int) -> QuantizedWeight:
    data = quantized_tensor(qtype, out_features, COLUMNS, np.random.default_rng(seed))
    return decode(data, qtype, (out_features, COLUMNS))


def _layers(qtype: T, out_features: int, seed: int = 0) -> tuple[InvariantLinear, InvariantLinear, QuantizedWeight]:
    """The same weights twice: with int8 activations, and with float ones."""
    weight = _weight(qtype, out_features, seed)
    linear = nn.Linear(COLUMNS, out_features, bias=True)
    int8 = InvariantLinear(linear, linear_kernel(), weight)
    assert quantize_activations(nn.Sequential(int8)) == 1 and int8.int8_activations
    return int8, InvariantLinear(linear, linear_kernel(), weight), weight


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 5, 13])
def test_the_products_are_the_reference_arithmetic_to_the_bit(qtype, rows):
    int8, _, weight = _layers(qtype, out_features=40)  # 40: a tile only partly filled
    x = torch.randn(rows, COLUMNS, generator=torch.Generator().manual_seed(rows))
    x[0, :32] = 0.0  # an all-zero block: d = 0
    assert torch.equal(int8(x), q8_reference(x, weight, int8.bias))
    xb = x.bfloat16()  # bf16 rows: the same arithmetic on their (exact) fp32 values, rounded to bf16
    assert torch.equal(int8(xb), q8_reference(xb, weight, int8.bias).bfloat16())


@settings(max_examples=25, deadline=None)
@given(
    qtype=st.sampled_from(INT8_TYPES),
    rows=st.integers(1, 20),
    position=st.integers(0, 19),
    threads=st.sampled_from([1, 2, 3]),
)
def test_a_row_is_the_same_bits_in_any_step(qtype, rows, position, threads):
    int8, _, _ = _layers(qtype, out_features=72)
    generator = torch.Generator().manual_seed(rows)
    probe, others = torch.randn(1, COLUMNS, generator=generator), torch.randn(rows, COLUMNS, generator=generator)
    alone, in_step = alone_and_in_step(int8, probe, others, position % (rows + 1), threads)
    assert torch.equal(alone, in_step)


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
def test_the_result_stays_close_to_the_float_products(qtype):
    """Relative error of a layer's output against its float32 products, on normal inputs: the
    blocks' 127 levels leave well under one percent."""
    int8, exact, _ = _layers(qtype, out_features=256)
    x = torch.randn(64, COLUMNS, generator=torch.Generator().manual_seed(0))
    want, got = exact(x), int8(x)
    relative = float((got - want).norm() / want.norm())
    assert 0 < relative < 0.01


def test_only_four_to_six_bit_layers_switch_and_gathered_rows_are_unchanged():
    kernel = linear_kernel()
    q4k = InvariantLinear(nn.Linear(COLUMNS, 48, bias=False), kernel, _weight(T.Q4_K, 48, 1))
    q8 = InvariantLinear(nn.Linear(COLUMNS, 48, bias=False), kernel, _weight(T.Q8_0, 48, 2))
    plain = InvariantLinear(nn.Linear(COLUMNS, 48, bias=False), kernel)
    ids = torch.tensor([0, 47, 5])
    rows_before = kernel.gather_rows(q4k, ids)
    assert quantize_activations(nn.ModuleList([q4k, q8, plain])) == 1
    assert q4k.int8_activations and not q8.int8_activations and not plain.int8_activations
    assert "activations=int8" in repr(q4k)
    assert torch.equal(kernel.gather_rows(q4k, ids), rows_before)  # a tied token table reads the same values


@pytest.fixture(scope="module", params=["haswell", "x86-64"])
def other_build(request, tmp_path_factory):
    """linear.c built for another instruction set this CPU also runs: AVX2 (no VNNI: pair sums by
    VPMADDUBSW) and the portable loops."""
    from shard.numerics.invariant_linear import LinearKernel
    from shard.numerics.kernels import FLAGS, HERE, _compiler

    compiler = _compiler()
    assert compiler
    target = tmp_path_factory.mktemp(request.param) / "linear.so"
    flags = [f for f in FLAGS if f != "-march=native"] + [f"-march={request.param}"]
    subprocess.run([compiler, *flags, "-I", str(HERE), "-o", str(target), str(HERE / "linear.c"), "-lm"], check=True)
    return LinearKernel(ctypes.CDLL(str(target)))


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
def test_other_instruction_sets_give_the_same_bits(other_build, qtype):
    kernel = other_build
    weight = _weight(qtype, 40, seed=3)
    layer = InvariantLinear(nn.Linear(COLUMNS, 40, bias=False), kernel, weight)
    x = torch.randn(9, COLUMNS, generator=torch.Generator().manual_seed(9))
    want = q8_reference(x, weight)
    layer.packed = kernel.quad_layout(layer)
    wtype = layer.wtype + INT8_ACTIVATIONS
    for rows in (slice(0, 1), slice(0, 3), slice(0, 9)):  # registers from the stored quads, and decoded tiles
        got = kernel(x[rows], layer.packed, layer.scales, layer.offsets, None, 40, wtype=wtype)
        assert torch.equal(got, want[rows])
