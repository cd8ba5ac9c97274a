"""Embeddings in the shard (Request.pooling): the final hidden states after the model's final
norm, pooled (last, mean, first), equal to transformers' own and the same bits however the input
is chunked and whatever shares the step; no token is sampled for them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.model_source import resolve_model
from shard.numerics.sampling import SamplingParams
from shard.runtime.engine import Engine, NewRequest
from shard.runtime.pooling import Pooling
from tests.shard.engine_driver import make_engine

INPUT = [(i * 53 + 7) % 4000 + 5 for i in range(26)]
BLOCK = 4


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def source(request, tiny_model_dir):
    return resolve_model(str(tiny_model_dir(request.param)))


@pytest.fixture(scope="module")
def engine(source) -> Engine:
    return make_engine(source, block_size=BLOCK)


def embed(engine: Engine, request_id: int, pooling: Pooling, chunks: list[int], companion: bool) -> list[float]:
    blocks = list(range(100 * request_id, 100 * request_id + 7))
    params = SamplingParams(temperature=0.0)
    batch = request_id
    if companion:  # a generating request decoding in every step
        engine.prefill(batch, [NewRequest(request_id + 1000, [9, 8, 7], 0, 3, list(range(1500, 1516)), params, 0)])
    found, done = [], 0
    for chunk in chunks:
        request = NewRequest(request_id, INPUT, done, chunk, blocks, params, 0, pooling=pooling)
        result = engine.decode([batch], {}, [request]) if companion else engine.prefill(batch, [request])
        found += [e for e in result.embeddings if e[0] == request_id]
        assert all(g.request_id != request_id for g in result.generations), "an embedding request sampled"
        done += chunk
    engine.clear(batch)
    [(_, vector)] = found
    return vector


@pytest.mark.parametrize("pooling", [Pooling.LAST, Pooling.MEAN, Pooling.FIRST])
def test_embedding_is_the_same_bits_whatever_the_step(engine, source, pooling):
    whole = embed(engine, 1, pooling, [26], companion=False)
    for request_id, chunks, companion in ((2, [5, 9, 12], False), (3, [1, 25], True), (4, [25, 1], True)):
        assert embed(engine, request_id, pooling, chunks, companion) == whole
    model = AutoModelForCausalLM.from_pretrained(source.path_or_id, dtype=torch.float32).eval()
    with torch.no_grad():
        states = model.model(torch.tensor([INPUT])).last_hidden_state[0]
    expected = {Pooling.LAST: states[-1], Pooling.MEAN: states.mean(0), Pooling.FIRST: states[0]}[pooling]
    assert torch.allclose(torch.tensor(whole), expected, atol=1e-5, rtol=1e-5)
