"""Constrained decoding in the engine: valid output, batch independence, resumption after preemption."""

from __future__ import annotations

import json

import jsonschema

from common.model_source import resolve_model
from router.grammar import json_schema_grammar
from shard.numerics.sampling import SamplingParams
from shard.runtime.grammar import GrammarCompiler
from support.tiny_models import smollm_tokenizer
from tests.shard.engine_driver import Driver, Tracked, make_engine

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["n"]}


def _engine(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir("llama")))
    engine = make_engine(source)
    engine.grammar_compiler = GrammarCompiler(source, engine.vocab_size)
    return engine


def _text(tokens: list[int]) -> str:
    return smollm_tokenizer().decode([t for t in tokens if t != 2])


def test_constrained_output_is_valid_and_batch_independent(tiny_model_dir):
    params = SamplingParams(temperature=1.0, seed=9, grammar=json_schema_grammar(json.dumps(SCHEMA)))
    prompt = smollm_tokenizer().encode("Give me JSON")
    alone = Driver(_engine(tiny_model_dir))
    solo = Tracked(1, prompt, params)
    alone.prefill([(solo, len(prompt))])
    for _ in range(14):
        alone.decode()
    busy = Driver(_engine(tiny_model_dir))
    others = [Tracked(10 + i, prompt[:2], SamplingParams(temperature=1.0, seed=i)) for i in range(3)]
    crowd = Tracked(1, prompt, params)
    busy.prefill([*((o, 2) for o in others), (crowd, len(prompt))])
    for _ in range(14):
        busy.decode()
    assert crowd.tokens == solo.tokens
    jsonschema.validate(json.loads(_text(solo.tokens)), SCHEMA)


def test_resumed_request_replays_its_grammar(tiny_model_dir):
    params = SamplingParams(temperature=1.0, seed=4, grammar=json_schema_grammar(json.dumps(SCHEMA)))
    prompt = smollm_tokenizer().encode("Give me JSON")
    full = Driver(_engine(tiny_model_dir))
    whole = Tracked(1, prompt, params)
    full.prefill([(whole, len(prompt))])
    for _ in range(14):
        full.decode()
    # Preempted after 3 tokens: recomputed from prompt + generated, random stream resumed at step 3.
    resumed = Driver(_engine(tiny_model_dir))
    again = Tracked(1, prompt + whole.tokens[:3], params, sampled_before=3)
    resumed.prefill([(again, len(again.prompt))])
    for _ in range(11):
        resumed.decode()
    assert whole.tokens[:3] + again.tokens == whole.tokens[: 3 + len(again.tokens)]
