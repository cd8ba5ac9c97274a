"""What TGI's and vLLM's users also send (issue 36's table), through the whole stack: TGI's
``truncate`` and vLLM's ``truncate_prompt_tokens``, ``chat_template_kwargs``, ``priority`` with
SCHEDULING_POLICY=priority, and the refusals they can earn.

One stack: a tiny random Llama whose chat template is written in Qwen3's style (it reads
``enable_thinking``), fp32, the priority policy.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from support.reasoning_templates import REASONING_TEMPLATES, with_chat_template
from tests.conftest import running_stack

HI = [{"role": "user", "content": "Tell me about the railways of the valley, in detail."}]
LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 20


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    folder = with_chat_template(
        tiny_model_dir("llama"), REASONING_TEMPLATES["qwen3"], tmp_path_factory.mktemp("qwen3-style")
    )
    # A batch of 4, so that a burst queues and priority decides who runs.
    env = {"MODEL_ID": str(folder), "MAX_TOTAL_TOKENS": "512", "SCHEDULING_POLICY": "priority", "MAX_BATCH_SIZE": "4"}
    with running_stack(env) as url:
        yield url


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack}/v1/", api_key="none", max_retries=0)


def post(stack: str, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{stack}{path}", json=body, timeout=120)


def prompt_tokens(stack: str, text: str) -> int:
    return int(post(stack, "/tokenize", {"prompt": text}).json()["count"])


def test_truncate_keeps_the_last_prompt_tokens(stack, client):
    full = prompt_tokens(stack, LONG_PROMPT)
    assert full > 100
    kept = client.completions.create(
        model="tgi", prompt=LONG_PROMPT, max_tokens=4, temperature=0, extra_body={"truncate_prompt_tokens": 50}
    )
    assert kept.usage is not None and kept.usage.prompt_tokens == 50
    # The same as sending those 50 tokens: the prompt really is the tail.
    ids = post(stack, "/tokenize", {"prompt": LONG_PROMPT}).json()["tokens"]
    tail = client.completions.create(model="tgi", prompt=ids[-50:], max_tokens=4, temperature=0)
    assert kept.choices[0].text == tail.choices[0].text
    # -1: the model's input limit (511 here) keeps the whole of this prompt.
    whole = client.completions.create(
        model="tgi", prompt=LONG_PROMPT, max_tokens=4, temperature=0, extra_body={"truncate_prompt_tokens": -1}
    )
    assert whole.usage is not None and whole.usage.prompt_tokens == full
    chat = client.chat.completions.create(
        model="tgi", messages=HI, max_tokens=2, extra_body={"truncate_prompt_tokens": 5}
    )
    assert chat.usage is not None and chat.usage.prompt_tokens == 5


def test_tgi_truncate(stack):
    answer = InferenceClient(base_url=stack).text_generation(
        LONG_PROMPT, max_new_tokens=3, truncate=20, details=True, decoder_input_details=False
    )
    assert answer.details is not None and answer.details.generated_tokens == 3
    r = post(stack, "/generate", {"inputs": LONG_PROMPT, "parameters": {"truncate": 20, "max_new_tokens": 2}})
    assert r.status_code == 200
    # Beyond the input limit, or not a positive count: a 400 naming the field.
    for bad in (10_000, 0, -3):
        r = post(stack, "/generate", {"inputs": "x", "parameters": {"truncate": bad}})
        assert r.status_code == 400 and r.json()["error_type"] == "validation", r.text
    r = post(stack, "/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"


def test_chat_template_kwargs_reach_the_template(stack, client):
    def count(kwargs: dict | None) -> int:
        body: dict[str, Any] = {"messages": HI}
        if kwargs is not None:
            body["chat_template_kwargs"] = kwargs
        r = post(stack, "/tokenize", body)
        assert r.status_code == 200, r.text
        return int(r.json()["count"])

    thinking, not_thinking = count(None), count({"enable_thinking": False})
    assert not_thinking > thinking  # the empty think block is in the prompt
    answer = client.chat.completions.create(
        model="tgi", messages=HI, max_tokens=2, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert answer.usage is not None and answer.usage.prompt_tokens == not_thinking
    for bad, why in (({"tokenize": True}, "may not set"), ("yes", "")):
        r = post(stack, "/v1/chat/completions", {"messages": HI, "chat_template_kwargs": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text
        assert why in r.json()["error"]["message"]


def test_priority_serves_the_urgent_request_first(stack):
    """A burst of low-priority requests fills the batch and the queue, then one urgent request
    comes: under the priority policy it preempts a running one at once and finishes before
    almost all of them, with exactly the tokens it gets alone (preemption is lossless)."""
    urgent = {"prompt": LONG_PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "priority": -10}
    alone = post(stack, "/v1/completions", urgent).json()["choices"][0]["text"]
    finished: list[str] = []

    def send(name: str, body: dict) -> str:
        r = post(stack, "/v1/completions", body)
        assert r.status_code == 200, r.text
        finished.append(name)
        return str(r.json()["choices"][0]["text"])

    background = {"prompt": LONG_PROMPT, "max_tokens": 120, "ignore_eos": True, "priority": 5}
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        low = [pool.submit(send, f"low{i}", {**background, "seed": i}) for i in range(20)]
        concurrent.futures.wait(low, timeout=0.5)
        done_before = len(finished)
        text = pool.submit(send, "urgent", urgent).result(timeout=300)
        concurrent.futures.wait(low, timeout=300)
    assert text == alone
    assert done_before < 12  # a queue was still waiting when it came
    # At most the batch that ran when it came finishes first (first come, first served: all 20).
    assert finished.index("urgent") <= done_before + 4, (done_before, finished)
    r = post(stack, "/v1/completions", {"prompt": "x", "priority": 2**40})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"


def prefix_hit_tokens(stack: str) -> float:
    text = httpx.get(f"{stack}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:prefix_cache_hits"))


def test_best_of_returns_the_most_likely_candidates_sharing_the_prompt(stack, client):
    """best_of=4, n=2, seed 7: the candidates are the requests seeded 7..10 (as n's choices are);
    the two with the highest cumulative logprob come back, best first; usage counts all four;
    the three that start after the first are served the prompt's blocks from the prefix cache."""
    prompt = "A unique prompt about signal boxes and level crossings. " * 6
    length = prompt_tokens(stack, prompt)
    before = prefix_hit_tokens(stack)
    ask = dict(model="tgi", prompt=prompt, max_tokens=12, temperature=1.0, seed=7)
    best = client.completions.create(**ask, n=2, best_of=4)  # type: ignore[call-overload]
    shared = prefix_hit_tokens(stack) - before
    assert shared >= 3 * (length // 16) * 16  # every full block of the prompt, for each later candidate
    alone = [client.completions.create(**{**ask, "seed": 7 + i}, logprobs=0) for i in range(4)]  # type: ignore[call-overload]
    scores = [sum(c.choices[0].logprobs.token_logprobs) for c in alone]
    ranked = sorted(range(4), key=lambda i: -scores[i])
    assert [c.text for c in best.choices] == [alone[i].choices[0].text for i in ranked[:2]]
    assert best.usage is not None
    assert best.usage.completion_tokens == sum(c.usage.completion_tokens for c in alone)


def test_tgi_best_of_reports_the_other_sequences(stack):
    answer = InferenceClient(base_url=stack).text_generation(
        "Signals and points", max_new_tokens=6, best_of=3, do_sample=True, details=True
    )
    assert answer.details is not None and len(answer.details.best_of_sequences or []) == 2
    score = sum(t.logprob for t in answer.details.tokens)
    for other in answer.details.best_of_sequences or []:
        assert other.seed is not None and sum(t.logprob for t in other.tokens) <= score
    r = post(stack, "/generate_stream", {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}})
    assert r.status_code == 400 and "stream" in r.json()["error"]
    assert httpx.get(f"{stack}/info").json()["max_best_of"] >= 2


def test_prompt_logprobs_agree_everywhere(stack, client):
    """TGI's decoder_input_details, vLLM's prompt_logprobs and completions' echo with logprobs give
    the same values; a prompt the prefix cache holds gives them too (it is computed in full); and
    a prompt token scores exactly what the model gave it when it generated that token."""
    prompt = "The night mail crosses the border, bringing the cheque and the postal order."
    ids = post(stack, "/tokenize", {"prompt": prompt}).json()["tokens"]
    client.completions.create(model="tgi", prompt=prompt, max_tokens=1)  # the prefix cache now holds it
    tgi = InferenceClient(base_url=stack).text_generation(
        prompt, max_new_tokens=1, details=True, decoder_input_details=True
    )
    assert tgi.details is not None
    prefill = tgi.details.prefill
    assert [t.id for t in prefill] == ids and prefill[0].logprob is None
    values = [t.logprob for t in prefill[1:]]
    assert all(v <= 0 for v in values)
    vllm = post(stack, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2}).json()
    entries = vllm["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    assert [entries[k][str(ids[k])]["logprob"] for k in range(1, len(ids))] == values
    for k in range(1, len(ids)):  # the token itself, and 2 alternatives ranked 1 and 2
        ranks = sorted(e["rank"] for e in entries[k].values())
        assert {1, 2} <= set(ranks) and entries[k][str(ids[k])]["rank"] >= 1
    echoed = client.completions.create(model="tgi", prompt=prompt, max_tokens=2, echo=True, logprobs=1)
    logprobs = echoed.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.tokens is not None
    assert logprobs.token_logprobs[0] is None and logprobs.token_logprobs[1 : len(ids)] == values
    assert len(logprobs.tokens) == len(ids) + 2 and echoed.choices[0].text.startswith(prompt)
    chat = post(stack, "/v1/chat/completions", {"messages": HI, "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    # The next token, generated greedily, then scored as part of the prompt: the same logprob.
    generated = InferenceClient(base_url=stack).text_generation(prompt, max_new_tokens=1, details=True)
    assert generated.details is not None
    token = generated.details.tokens[0]
    again = post(stack, "/v1/completions", {"prompt": [*ids, token.id], "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert again["choices"][0]["prompt_logprobs"][-1][str(token.id)]["logprob"] == token.logprob
    for bad in ({"stream": True, "prompt_logprobs": 1}, {"prompt_logprobs": 21}):
        r = post(stack, "/v1/completions", {"prompt": "x", **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    r = post(stack, "/generate_stream", {"inputs": "x", "parameters": {"decoder_input_details": True}})
    assert r.status_code == 400
