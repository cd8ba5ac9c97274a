"""Speculative decoding through the whole stack (issue 34): with SPECULATE=4 (n-gram guesses) the
answers are exactly those of a stack with SPECULATE=0, greedy and seeded, streamed or not, with
logprobs, stop sequences and several choices; and the guesses are counted in TGI's and vLLM's
metrics. Two stacks on the tiny random Llama, fp32. Random weights rarely repeat a token, so
the requests favour their prompt's tokens (logit_bias): their output then copies its input, as a
grounded answer does, and the n-gram guesses are often right.

SPECULATIVE_METHOD=draft runs a third stack whose shard has the same tiny model as its draft
(DRAFT_MODEL_ID): its greedy guesses are the model's own, and every answer is again the plain
stack's."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import running_stack

GROUNDED = (
    "Rewrite this timetable note: The 8:15 from York calls at Leeds, Wakefield and Sheffield. "
    "The 8:15 from York calls at Leeds, Wakefield and Sheffield. Rewritten:"
)
BODIES: list[dict[str, Any]] = [
    {"prompt": GROUNDED, "max_tokens": 64, "temperature": 0, "ignore_eos": True, "logprobs": 2},
    {"prompt": GROUNDED, "max_tokens": 64, "temperature": 0.8, "seed": 11, "n": 2, "ignore_eos": True},
    {"prompt": GROUNDED, "max_tokens": 48, "temperature": 0.7, "top_p": 0.9, "seed": 3, "repetition_penalty": 1.1},
    {"prompt": "one two three one two three one two", "max_tokens": 40, "temperature": 0, "stop": [" three one"]},
]


@pytest.fixture(scope="module")
def stacks(tiny_model_dir):
    base = {"MODEL_ID": str(tiny_model_dir("llama")), "MAX_TOTAL_TOKENS": "512"}
    with running_stack({**base, "SPECULATE": "4"}) as speculating, running_stack({**base, "SPECULATE": "0"}) as plain:
        yield speculating, plain


def completion(stack: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{stack}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    del answer["id"], answer["created"]
    return answer


def streamed(stack: str, body: dict[str, Any]) -> dict[int, str]:
    """Each choice's streamed text (choices interleave as their tokens come)."""
    r = httpx.post(f"{stack}/v1/completions", json={**body, "stream": True}, timeout=120)
    texts: dict[int, str] = {}
    for line in r.text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            for choice in json.loads(line[5:])["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


def counter(stack: str, name: str) -> float:
    text = httpx.get(f"{stack}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def copying(stack: str, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with its prompt's tokens favoured."""
    ids = httpx.post(f"{stack}/tokenize", json={"prompt": body["prompt"]}, timeout=30).json()["tokens"]
    return {**body, "logit_bias": {str(t): 8 for t in set(ids)}}


def test_speculation_never_changes_an_answer(stacks):
    speculating, plain = stacks
    for body in [copying(plain, b) for b in BODIES]:
        assert completion(speculating, body) == completion(plain, body), body
        assert streamed(speculating, body) == streamed(plain, body), body
    # A structured output: guesses are checked against the grammar, each row masked by its own state.
    schema = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 80}}, "required": ["note"]}
    chat = copying(plain, {"prompt": GROUNDED})
    del chat["prompt"]
    chat |= {
        "messages": [{"role": "user", "content": GROUNDED}], "max_tokens": 60, "temperature": 0.7, "seed": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    }  # fmt: skip
    answers = []
    for stack in (speculating, plain):
        r = httpx.post(f"{stack}/v1/chat/completions", json=chat, timeout=120)
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"]["content"])
    assert answers[0] == answers[1]
    drafted = counter(speculating, "vllm:spec_decode_num_draft_tokens_total")
    accepted = counter(speculating, "vllm:spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and 0 < accepted <= drafted
    assert counter(plain, "vllm:spec_decode_num_draft_tokens_total") == 0
    assert counter(speculating, "tgi_request_skipped_tokens_sum") == accepted


@pytest.fixture(scope="module")
def drafting(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    env = {"MODEL_ID": model, "MAX_TOTAL_TOKENS": "512", "SPECULATE": "3", "SPECULATIVE_METHOD": "draft",
           "DRAFT_MODEL_ID": model}  # fmt: skip
    with running_stack(env) as url:
        yield url


def test_draft_model_guesses_never_change_an_answer(stacks, drafting):
    _, plain = stacks
    greedy = [b for b in BODIES if b["temperature"] == 0]
    for body in greedy + [b for b in BODIES if b not in greedy] + [copying(plain, BODIES[1])]:
        ours, theirs = completion(drafting, body), completion(plain, body)
        for answer in (ours, theirs):  # the plain stack has these prompts cached from the test above
            del answer["usage"]["prompt_tokens_details"]
        assert ours == theirs, body
        assert streamed(drafting, body) == streamed(plain, body), body
        if body is greedy[-1]:
            # Greedy guesses of the model itself: every one is kept.
            drafted = counter(drafting, "vllm:spec_decode_num_draft_tokens_total")
            assert drafted > 0 and counter(drafting, "vllm:spec_decode_num_accepted_tokens_total") == drafted
    assert counter(drafting, "vllm:spec_decode_num_accepted_tokens_total") <= counter(
        drafting, "vllm:spec_decode_num_draft_tokens_total"
    )
