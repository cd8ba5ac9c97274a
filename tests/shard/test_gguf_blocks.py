"""GGUF blocks stored as they are (shard.loading.gguf_blocks, shard.loading.gguf_storage): every type's values are
the ``gguf`` package's reference de-quantization to the bit, at every step size on the kernel."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from common.model_source import resolve_model
from shard.loading.gguf_blocks import SUPPORTED, UnsupportedType, check_supported, decode
from shard.numerics.invariant_linear import InvariantLinear, TiledEmbedding, linear_kernel
from support.gguf_files import MIXED_TYPES, build_tiny_gguf, quantized_tensor
from tests.shard.linear_steps import alone_and_in_step

#: The kernel storage each type is re-encoded as.
STORAGE = {
    T.Q4_0: "int4", T.Q4_1: "int4", T.Q4_K: "q4_k", T.Q5_0: "int8", T.Q5_1: "int8", T.Q5_K: "q5_k",
    T.Q8_0: "int8", T.Q6_K: "q6_k",
}  # fmt: skip


def _random_blocks(qtype: T, rows: int, columns: int, seed: int) -> np.ndarray:
    """Every byte random but the float16 scale fields (kept finite and small): all bit patterns of
    q, sub-block scales and mins occur."""
    rng = np.random.default_rng(seed)
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        return quantized_tensor(qtype, rows, columns, rng)  # random blocks, d and dmin set
    per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, columns // per_block, block_bytes), dtype=np.uint8)
    for offset in (0, 2) if qtype in (T.Q4_1, T.Q5_1) else (0,):  # d, and m where the type has one
        halves = (rng.standard_normal(blocks.shape[:2]) * 0.01).astype(np.float16)
        blocks[..., offset : offset + 2] = halves.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_every_type_decodes_to_the_reference_values_bit_for_bit(qtype):
    rows, columns = 40, 512
    data = _random_blocks(qtype, rows, columns, seed=int(qtype))
    want = torch.from_numpy(dequantize(data, qtype).reshape(rows, columns).copy())
    weight = decode(data, qtype, (rows, columns))
    got = weight.dequantize()
    assert torch.equal(got, want)
    # To the bit: the same float32 patterns, zeros aside (the kernel's fma gives +0 where the
    # reference's d * 0 may give -0: equal values in every product and sum).
    nonzero = want != 0
    assert torch.equal(got[nonzero].view(torch.int32), want[nonzero].view(torch.int32))
    assert weight.scale.shape == (rows, columns // weight.group)


@settings(max_examples=30, deadline=None)
@given(
    qtype=st.sampled_from(SUPPORTED),
    rows=st.integers(1, 20),
    position=st.integers(0, 19),
    threads=st.sampled_from([1, 2, 3]),
    out_features=st.sampled_from([16, 40, 200]),
)
def test_each_type_gives_a_row_the_reference_bits_at_every_step_size(qtype, rows, position, threads, out_features):
    """The kernel on a type's blocks computes with exactly the reference's float32 weights: a row
    alone, or anywhere in a step of up to 21 rows (registers or buffered tiles), any thread count,
    is the bits of the same layer holding those weights as float32."""
    kernel = linear_kernel()
    columns = 512
    weight = decode(_random_blocks(qtype, out_features, columns, seed=out_features), qtype, (out_features, columns))
    linear = nn.Linear(columns, out_features, bias=True)
    layer = InvariantLinear(linear, kernel, weight)
    assert layer.storage == STORAGE[qtype]
    plain = nn.Linear(columns, out_features, bias=True)
    with torch.no_grad():
        plain.weight.copy_(weight.dequantize())
        plain.bias.copy_(linear.bias)
    reference = InvariantLinear(plain, kernel)
    generator = torch.Generator().manual_seed(rows)
    probe = torch.randn(1, columns, generator=generator)
    others = torch.randn(rows, columns, generator=generator)
    where = position % (rows + 1)
    alone, in_step = alone_and_in_step(layer, probe, others, where, threads)
    assert torch.equal(alone, reference(probe))
    assert torch.equal(in_step, alone)
    # Rows gathered from the tiles (an embedding table kept as its head's) are the weights' rows.
    ids = torch.tensor([0, out_features - 1, where % out_features, where % out_features])
    assert torch.equal(kernel.gather_rows(layer, ids), weight.dequantize()[ids])


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ2_XS, T.TQ1_0], ids=lambda t: t.name)
def test_other_types_are_refused_by_name(qtype):
    with pytest.raises(UnsupportedType, match=re.escape(f"blk.0.attn_q.weight is {qtype.name}")):
        check_supported(qtype, "blk.0.attn_q.weight")
    check_supported(T.F16, "blk.0.attn_norm.weight")  # float tensors are loaded as they are


def test_a_file_of_an_unsupported_type_stops_the_start_naming_it(tmp_path):
    from shard.loading.model_loader import load_model

    path = build_tiny_gguf(tmp_path, {"blk.0.attn_output": T.IQ4_NL, "blk.1.ffn_up": T.Q4_K})
    with pytest.raises(SystemExit, match=re.escape("blk.0.attn_output.weight is IQ4_NL")):
        load_model(resolve_model(str(path)), torch.float32, torch.device("cpu"), quantize="auto")


def test_the_token_table_stays_in_its_blocks_and_gives_the_loaded_rows(tiny_model_dir):
    """The GGUF file's Q8_0 token table is kept as its blocks (TiledEmbedding): a lookup gives the
    rows of the de-quantized table transformers loads, bit for bit, in float32 and in bf16."""
    from shard.loading.model_loader import load_model

    source = resolve_model(str(tiny_model_dir("gguf")))
    ids = torch.tensor([[0, 5, 49151], [17, 17, 3000]])
    for dtype in (torch.float32, torch.bfloat16):
        stored = load_model(source, dtype, torch.device("cpu"), quantize="auto").get_input_embeddings()
        plain = load_model(source, dtype, torch.device("cpu"), quantize="none").get_input_embeddings()
        assert isinstance(stored, TiledEmbedding) and not isinstance(plain, TiledEmbedding)
        assert torch.equal(stored(ids), plain(ids))
        assert stored(ids).dtype == dtype


def test_a_tied_token_table_is_the_heads_tiles(tmp_path):
    """With no ``output`` tensor the head is the token table: one set of tiles serves both, and a
    lookup still gives the loaded table's rows; ids outside the vocabulary are an IndexError."""
    from shard.loading.model_loader import load_model

    path = build_tiny_gguf(tmp_path, {**MIXED_TYPES, "token_embd": T.Q4_K}, tied=True)
    source = resolve_model(str(path))
    stored = load_model(source, torch.float32, torch.device("cpu"), quantize="auto")
    plain = load_model(source, torch.float32, torch.device("cpu"), quantize="none")
    table = stored.get_input_embeddings()
    assert isinstance(table, TiledEmbedding) and table.table.layer is stored.get_output_embeddings()
    assert table.table.layer.storage == "q4_k"
    ids = torch.tensor([[3, 49151, 0], [7, 7, 100]])
    assert torch.equal(table(ids), plain.get_input_embeddings()(ids))
    with pytest.raises(IndexError):
        table(torch.tensor([49152]))
