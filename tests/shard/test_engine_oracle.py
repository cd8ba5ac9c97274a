"""The shard engine against transformers' generate, the correctness oracle.

Greedy tokens must match token for token, and logprobs within 1e-3, while
requests of different lengths join and leave the batch mid-way, with chunked
prefill; a seeded sampled request gives the same tokens alone and in a batch.
"""

from __future__ import annotations

import pytest

from common.model_source import resolve_model
from shard.numerics.invariant_linear import InvariantLinear, TiledEmbedding
from shard.numerics.sampling import SamplingParams
from support.tiny_models import SMOLLM, smollm_tokenizer
from tests.shard.engine_driver import Driver, Tracked, make_engine, reference

GREEDY = SamplingParams()
NEW_TOKENS = 12

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Hi there",
    "In the beginning the universe was created. This has made a lot of people very angry and been widely "
    "regarded as a bad move.",
]


def _run_mixed_batch(driver: Driver, prompts: list[list[int]]) -> list[Tracked]:
    """A starts; B joins after 3 steps; C (chunked in two) joins after 5; A leaves when done."""
    a, b, c = (Tracked(i + 1, p, GREEDY) for i, p in enumerate(prompts))
    driver.prefill([(a, len(a.prompt))])
    for _ in range(3):
        driver.decode()
    driver.prefill([(b, len(b.prompt))])
    driver.decode()
    half = len(c.prompt) // 2
    driver.prefill([(c, half)])
    driver.decode()  # C is mid-prompt: only A and B advance
    driver.prefill([(c, len(c.prompt) - half - 1)])
    driver.decode()  # one prompt token of C left: still a prefill, not a decode
    assert not c.tokens
    driver.prefill([(c, 1)])
    while any(len(t.tokens) < NEW_TOKENS for t in (a, b, c)):
        for t in (a, b, c):
            if len(t.tokens) >= NEW_TOKENS and t.request_id in driver.live:
                driver.finish(t)
        driver.decode()
    return [a, b, c]


@pytest.mark.parametrize(
    ("kind", "backend"),
    [
        *[(kind, "cpu-paged") for kind in ("llama", "qwen2", "mistral", "mixtral")],
        # The portable backend too, with and without a sliding window.
        ("llama", "sdpa"),
        ("mistral", "sdpa"),
    ],
)
def test_tiny_models_match_transformers(kind, backend, tiny_model_dir):
    source = resolve_model(str(tiny_model_dir(kind)))
    tok = smollm_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    engine = make_engine(source, attention_backend=backend)
    assert engine.runner.attention.name == backend
    tracked = _run_mixed_batch(Driver(engine), prompts)
    for t in tracked:
        want_tokens, want_logprobs = reference(source, t.prompt, NEW_TOKENS)
        assert t.tokens[:NEW_TOKENS] == want_tokens, f"request {t.request_id}"
        for got, want in zip(t.logprobs, want_logprobs, strict=False):
            assert got == pytest.approx(want, abs=1e-3)


def test_gguf_blocks_of_every_type_match_transformers(tiny_model_dir):
    """A GGUF file whose linears hold every stored type (Q4_0 ... Q6_K, support.gguf_files), served
    from its own blocks (QUANTIZE=auto): transformers' greedy tokens on the float32 model it
    de-quantizes, logprobs within 1e-3."""
    source = resolve_model(str(tiny_model_dir("gguf")))
    tok = smollm_tokenizer()
    engine = make_engine(source, quantize="auto")
    storage = {m.storage for m in engine.model.modules() if isinstance(m, InvariantLinear)}
    assert storage == {"int4", "int8", "q4_k", "q5_k", "q6_k"}
    assert isinstance(engine.model.get_input_embeddings(), TiledEmbedding)  # its Q8_0 table as stored
    tracked = _run_mixed_batch(Driver(engine), [tok.encode(p) for p in PROMPTS])
    for t in tracked:
        want_tokens, want_logprobs = reference(source, t.prompt, NEW_TOKENS)
        assert t.tokens[:NEW_TOKENS] == want_tokens, f"request {t.request_id}"
        for got, want in zip(t.logprobs, want_logprobs, strict=False):
            assert got == pytest.approx(want, abs=1e-3)


def test_smollm2_matches_transformers():
    tok = smollm_tokenizer()
    chat = [{"role": "user", "content": "Why is open-source software important?"}]
    prompts = [
        tok.encode(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), add_special_tokens=False),
        tok.encode(PROMPTS[0]),
        tok.encode(PROMPTS[2]),
    ]
    tracked = _run_mixed_batch(Driver(make_engine(SMOLLM)), prompts)
    for t in tracked:
        want_tokens, want_logprobs = reference(SMOLLM, t.prompt, NEW_TOKENS)
        assert t.tokens[:NEW_TOKENS] == want_tokens
        for got, want in zip(t.logprobs, want_logprobs, strict=False):
            assert got == pytest.approx(want, abs=1e-3)


def test_seeded_sample_is_batch_independent(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir("llama")))
    prompt = smollm_tokenizer().encode(PROMPTS[0])
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234)

    alone = Driver(make_engine(source))
    solo = Tracked(1, prompt, params)
    alone.prefill([(solo, len(prompt))])
    for _ in range(15):
        alone.decode()

    busy = Driver(make_engine(source))
    others = [Tracked(10 + i, prompt[: 3 + i], SamplingParams(temperature=0.7, seed=i)) for i in range(3)]
    busy.prefill([(o, len(o.prompt)) for o in others])
    busy.decode()
    crowd = Tracked(1, prompt, params)
    busy.prefill([(crowd, len(prompt))])
    for _ in range(15):
        busy.decode()
    assert crowd.tokens == solo.tokens
    assert len(set(solo.tokens)) > 1  # it did sample
