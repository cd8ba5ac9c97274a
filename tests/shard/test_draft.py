"""Speculative decoding with a draft model in the shard (Guesses.draft, shard.runtime.drafter):
the tokens, logprobs and alternatives are decoding's own whatever the draft (the model itself,
or another random model), and the draft's KV stays right through catch-up and prefix reuse."""

from __future__ import annotations

import pytest

from common.model_source import resolve_model
from shard.numerics.sampling import SamplingParams
from shard.runtime.engine import Engine, Generation, NewRequest
from shard.runtime.errors import InvalidRequest
from tests.shard.engine_driver import make_engine
from tests.shard.test_speculation import BLOCK, NEW, PARAMS

PROMPT = [(i * 41 + 3) % 3000 + 5 for i in range(14)]
WIDTH = 3


@pytest.fixture(scope="module")
def self_drafted(tiny_model_dir) -> Engine:
    """Tiny Llama drafting for itself: every greedy guess is right."""
    source = resolve_model(str(tiny_model_dir("llama")))
    return make_engine(source, block_size=BLOCK, draft=source)


@pytest.fixture(scope="module")
def random_drafted(tiny_model_dir) -> Engine:
    """Tiny Llama with a random tiny Qwen2 (same vocabulary) as its draft: guesses mostly wrong."""
    return make_engine(
        resolve_model(str(tiny_model_dir("llama"))), block_size=BLOCK, draft=resolve_model(str(tiny_model_dir("qwen2")))
    )


def run(
    engine: Engine, params: SamplingParams, width: int, companion: bool = False, rid: int = 7, first_block: int = 0
) -> tuple[list[Generation], int]:
    """NEW tokens of PROMPT with ``width`` draft guesses a step (0: plain decoding); (generations, steps)."""
    batch = 70 + rid
    blocks = list(range(first_block, first_block + 12))  # 48 slots: prompt, output and guesses
    requests = [NewRequest(rid, PROMPT, 0, len(PROMPT), blocks, params, 0)]
    if companion:
        requests.append(NewRequest(rid + 1, [5, 6, 7, 8], 0, 4, list(range(40, 60)), PARAMS["seeded"], 0))
    out = [g for g in engine.prefill(batch, requests).generations if g.request_id == rid]
    steps = 0
    while len(out) < NEW:
        k = min(width, NEW - len(out) - 1)
        drafts = {rid: k, rid + 1: k} if k > 0 else None
        result = engine.decode([batch], {}, drafts=drafts)
        out += [g for g in result.generations if g.request_id == rid]
        steps += 1
    engine.clear(batch)
    return out[:NEW], steps


def as_compared(generations: list[Generation]) -> list[tuple[int, float, list[tuple[int, float]]]]:
    return [(g.token_id, g.logprob, g.top) for g in generations]


@pytest.mark.parametrize("kind", sorted(PARAMS))
@pytest.mark.parametrize("draft", ["self_drafted", "random_drafted"])
def test_drafted_output_is_decodings(request, draft, kind):
    engine = request.getfixturevalue(draft)
    reference, plain_steps = run(engine, PARAMS[kind], 0)
    for companion in (False, True):
        got, steps = run(engine, PARAMS[kind], WIDTH, companion)
        assert as_compared(got) == as_compared(reference), (draft, kind, companion)
        if draft == "self_drafted" and kind == "greedy":
            # The model's own greedy continuation: every guess holds, a step keeps WIDTH + 1 tokens.
            assert steps == -(-(NEW - 1) // (WIDTH + 1)), steps
        assert steps <= plain_steps


def test_draft_catches_up_over_steps(tiny_model_dir):
    """A draft that may compute only 5 positions a step guesses once it has the whole prompt,
    and from then on keeps every greedy guess of its own model."""
    source = resolve_model(str(tiny_model_dir("llama")))
    engine = make_engine(source, block_size=BLOCK, draft=source)
    assert engine.drafter is not None
    engine.drafter.max_catch_up = 5
    reference, _ = run(engine, PARAMS["greedy"], 0)
    got, steps = run(engine, PARAMS["greedy"], WIDTH)
    assert as_compared(got) == as_compared(reference)
    catching_up = -(-len(PROMPT) // 5) - 1  # steps whose draft work is the prompt only
    assert steps == catching_up + -(-(NEW - 1 - catching_up) // (WIDTH + 1))


def test_cached_prefix_keeps_draft_kv_where_it_holds(self_drafted):
    """A request reusing another's full blocks (a prefix-cache hit) starts its draft after the
    cached positions whose draft KV the other computed, and at 0 where it computed none."""
    engine = self_drafted
    assert engine.drafter is not None
    params = PARAMS["greedy"]
    # Computed by prefill alone (no draft ran): the draft KV of those slots does not hold.
    engine.prefill(90, [NewRequest(1, PROMPT, 0, len(PROMPT), list(range(100, 112)), params, 0)])
    reused = engine.prefill(91, [NewRequest(2, PROMPT, 8, len(PROMPT) - 8, [100, 101, 120, 121], params, 0)])
    assert reused.generations and engine.store.sequences[2].drafted == 0
    # Once a drafted step has run for request 1, its prompt's draft KV holds.
    engine.decode([90], {}, drafts={1: 2})
    engine.clear(None)
    engine.prefill(92, [NewRequest(3, PROMPT, 8, len(PROMPT) - 8, [100, 101, 130, 131], params, 0)])
    assert engine.store.sequences[3].drafted == 8
    engine.clear(None)


def test_draft_without_draft_model_is_refused(tiny_model_dir):
    engine = make_engine(resolve_model(str(tiny_model_dir("llama"))), block_size=BLOCK)
    engine.prefill(1, [NewRequest(1, PROMPT, 0, len(PROMPT), list(range(12)), PARAMS["greedy"], 0)])
    with pytest.raises(InvalidRequest, match="no draft model"):
        engine.decode([1], {}, drafts={1: 2})


def test_a_draft_with_another_vocabulary_is_refused(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    engine = make_engine(resolve_model(str(tiny_model_dir("llama"))), block_size=BLOCK)
    other = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1), dtype=torch.float32
    )  # fmt: skip
    with pytest.raises(ValueError, match="vocabulary has 1000 tokens"):
        engine.add_drafter(other)
