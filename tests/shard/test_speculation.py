"""Speculative decoding's verification in the shard (DecodeRequest.guesses): whatever the guesses
(all right, all wrong, half right) and whatever shares the step, the tokens, logprobs and
alternatives a request gets are decoding's own, bit for bit, greedy and seeded sampling alike."""

from __future__ import annotations

import json
import random

import pytest

from common.model_source import resolve_model
from router.grammar import json_schema_grammar
from shard.numerics.sampling import SamplingParams
from shard.runtime.engine import Engine, Generation, NewRequest
from shard.runtime.grammar import GrammarCompiler
from tests.shard.engine_driver import make_engine

PROMPT = [(i * 41 + 3) % 3000 + 5 for i in range(12)]
NEW = 24
BLOCK = 4

PARAMS = {
    "greedy": SamplingParams(temperature=0.0, top_n_tokens=2),
    "seeded": SamplingParams(temperature=0.9, top_p=0.9, seed=1234, repetition_penalty=1.1, top_n_tokens=2),
}


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return make_engine(resolve_model(str(tiny_model_dir("llama"))), block_size=BLOCK)


def run(engine: Engine, params: SamplingParams, guess, companion: bool = False) -> tuple[list[Generation], int]:
    """NEW tokens of PROMPT, each step's guesses from ``guess(tokens so far)``; (generations, steps)."""
    rid, batch = 7, 70
    blocks = list(range(0, 12))  # 48 token slots: prompt, output and guesses
    requests = [NewRequest(rid, PROMPT, 0, len(PROMPT), blocks, params, 0)]
    if companion:
        requests.append(NewRequest(rid + 1, [5, 6, 7, 8], 0, 4, list(range(20, 40)), PARAMS["seeded"], 0))
    out = [g for g in engine.prefill(batch, requests).generations if g.request_id == rid]
    steps = 0
    while len(out) < NEW:
        tokens = [g.token_id for g in out]
        guesses = guess(tokens)[: NEW - len(out) - 1]
        result = engine.decode([batch], {}, guesses={rid: guesses} if guesses else None)
        out += [g for g in result.generations if g.request_id == rid]
        steps += 1
    engine.clear(batch)
    return out[:NEW], steps


def check_against_decoding(
    engine: Engine, params: SamplingParams, width: int, companions: tuple[bool, ...], seed: int
) -> tuple[int, list[int]]:
    """Runs ``params`` with right guesses (``width`` of them), wrong or grammar-refused ones, and
    half-right ones, each with and without the ``companions``; asserts every run's tokens,
    logprobs and alternatives are decoding's. Returns decoding's steps and the right runs' steps."""
    reference, plain_steps = run(engine, params, lambda tokens: [])
    truth = [g.token_id for g in reference]
    rng = random.Random(seed)
    strategies = {
        "right": lambda tokens: truth[len(tokens) : len(tokens) + width],
        "wrong": lambda tokens: [rng.randrange(5, 3000) for _ in range(3)],
        "half": lambda tokens: [*truth[len(tokens) : len(tokens) + width // 2], 1, 2],
    }
    right_steps = []
    for name, guess in strategies.items():
        for companion in companions:
            got, steps = run(engine, params, guess, companion)
            assert [(g.token_id, g.logprob, g.top) for g in got] == [
                (g.token_id, g.logprob, g.top) for g in reference
            ], (name, companion)
            if name == "right":
                right_steps.append(steps)
    return plain_steps, right_steps


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_verification_equals_decoding(engine, kind):
    plain_steps, right_steps = check_against_decoding(engine, PARAMS[kind], 4, (False, True), seed=5)
    assert all(steps <= plain_steps // 4 + 1 for steps in right_steps)  # 4 guesses and a draw per step


def test_constrained_verification_equals_decoding(tiny_model_dir):
    """With a JSON schema: each verification row gets the grammar state after the guesses before
    it, a guess the grammar refuses ends the run, and the tokens are decoding's own."""
    source = resolve_model(str(tiny_model_dir("llama")))
    engine = make_engine(source, block_size=BLOCK)
    engine.grammar_compiler = GrammarCompiler(source, engine.vocab_size)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}}, "required": ["name"]}
    params = SamplingParams(temperature=0.8, seed=77, grammar=json_schema_grammar(json.dumps(schema)), top_n_tokens=2)
    plain_steps, right_steps = check_against_decoding(engine, params, 3, (False,), seed=9)
    assert all(steps < plain_steps for steps in right_steps)
