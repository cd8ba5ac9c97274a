"""Prompt logprobs in the shard (Request.score_inputs): each input token's logprob, rank and top
alternatives under the model's raw distribution, equal to transformers' own (float32), and the
same bits however the prompt is chunked and whatever shares the step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.model_source import resolve_model
from shard.numerics.sampling import SamplingParams
from shard.runtime.engine import Engine, InputScores, NewRequest
from tests.shard.engine_driver import make_engine

PROMPT = [(i * 37 + 11) % 4000 + 5 for i in range(30)]
BLOCK = 4


@pytest.fixture(scope="module")
def source(tiny_model_dir):
    return resolve_model(str(tiny_model_dir("llama")))


@pytest.fixture(scope="module")
def engine(source) -> Engine:
    return make_engine(source, block_size=BLOCK)


def blocks_for(first: int, tokens: int) -> list[int]:
    return list(range(first, first + -(-tokens // BLOCK)))


def scores_in_chunks(engine: Engine, request_id: int, chunks: list[int], companion: bool = False) -> InputScores:
    """The prompt computed in ``chunks`` (each scored), with a decoding companion in every step when asked."""
    params = SamplingParams(temperature=0.0, top_n_tokens=3)
    blocks = blocks_for(100 * request_id, len(PROMPT))
    batch = request_id
    if companion:
        other = [7, 8, 9, 10, 11]
        engine.prefill(batch, [NewRequest(request_id + 1000, other, 0, 5, blocks_for(1500, 64), params, 0)])
    found: list[InputScores] = []
    done = 0
    for chunk in chunks:
        request = NewRequest(request_id, PROMPT, done, chunk, blocks, params, 0, score_inputs=True)
        result = engine.decode([batch], {}, [request]) if companion else engine.prefill(batch, [request])
        found += result.input_scores
        done += chunk
    engine.clear(batch)
    # Each chunk scores the tokens after its positions: contiguous, the last prompt token's
    # position (which samples) scoring nothing.
    assert [s.first_position for s in found] == [1 + sum(chunks[:k]) for k in range(len(found))]
    return InputScores(
        request_id,
        1,
        [x for s in found for x in s.logprobs],
        [x for s in found for x in s.ranks],
        [x for s in found for x in s.top],
    )


def test_scores_do_not_depend_on_chunks_or_companions(engine):
    whole = scores_in_chunks(engine, 1, [30])
    assert len(whole.logprobs) == 29  # every token but the first
    for request_id, chunks, companion in ((2, [7, 11, 12], False), (3, [1, 4, 25], True), (4, [29, 1], False)):
        other = scores_in_chunks(engine, request_id, chunks, companion)
        assert other.logprobs == whole.logprobs and other.ranks == whole.ranks and other.top == whole.top


def test_scores_equal_transformers(engine, source):
    ours = scores_in_chunks(engine, 5, [13, 17])
    model = AutoModelForCausalLM.from_pretrained(source.path_or_id, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0, :-1].float()
    reference = torch.log_softmax(logits, -1)
    targets = torch.tensor(PROMPT[1:])
    expected = reference.gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(ours.logprobs), expected, atol=1e-4)
    assert ours.ranks == ((logits > logits.gather(1, targets[:, None])).sum(1) + 1).tolist()
    assert [[t for t, _ in top] for top in ours.top] == reference.topk(3, dim=-1).indices.tolist()
