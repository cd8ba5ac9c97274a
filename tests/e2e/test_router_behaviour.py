"""Router behaviour seen from outside: prefix cache, disconnects, overload, metrics."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import running_stack

MAX_CONCURRENT = 4


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    env = {"MODEL_ID": str(tiny_model_dir("llama")), "MAX_CONCURRENT_REQUESTS": str(MAX_CONCURRENT)}
    with running_stack(env) as url:
        yield url


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
    return values


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1/", api_key="-")


def test_metrics_are_exposed_and_move(stack):
    before = metrics(stack)
    for name in ("tgi_queue_size", "tgi_batch_current_size", "switchyard_kv_blocks_used", "switchyard_kv_blocks_free"):
        assert name in before
    client(stack).chat.completions.create(model="tgi", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    after = metrics(stack)
    assert after["tgi_request_count_total"] == before["tgi_request_count_total"] + 1  # the parser adds _total
    assert after["switchyard_prefill_tokens_total"] > before["switchyard_prefill_tokens_total"]


def test_shared_system_prompt_is_served_from_the_prefix_cache(stack):
    system = "You are a meticulous railway historian. " * 30
    c = client(stack)

    def ask(question: str, stream: bool = False) -> int:
        """Sends the question; returns usage.prompt_tokens_details.cached_tokens."""
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        if not stream:
            answer = c.chat.completions.create(model="tgi", messages=messages, max_tokens=2)
            return answer.usage.prompt_tokens_details.cached_tokens
        chunks = c.chat.completions.create(
            model="tgi", messages=messages, max_tokens=2, stream=True, stream_options={"include_usage": True}
        )
        return next(ch.usage for ch in chunks if ch.usage).prompt_tokens_details.cached_tokens

    assert ask("When did steam end?") == 0
    before = metrics(stack)
    cached = ask("Who built the first tunnel?")
    after = metrics(stack)
    hits = after["switchyard_prefix_cache_hit_tokens_total"] - before["switchyard_prefix_cache_hit_tokens_total"]
    computed = after["switchyard_prefill_tokens_total"] - before["switchyard_prefill_tokens_total"]
    assert hits >= 200  # the system prompt is ~240 tokens
    assert computed < 60  # only the question and template tail were computed
    assert cached == hits  # reported to the client as OpenAI does
    assert ask("Who dug the second tunnel?", stream=True) >= 200
    for expected_min in (0, 200):  # the same raw prompt twice: the second is served from the cache
        completion = httpx.post(f"{stack}/v1/completions", json={"prompt": system, "max_tokens": 1}).json()
        assert completion["usage"]["prompt_tokens_details"]["cached_tokens"] >= expected_min


def test_disconnect_mid_stream_frees_blocks(stack):
    c = client(stack)
    stream = c.chat.completions.create(
        model="tgi",
        messages=[{"role": "user", "content": "Talk for a long time."}],
        max_tokens=1500,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 5:
            break
    assert metrics(stack)["switchyard_kv_blocks_used"] > 0
    stream.close()
    deadline = time.monotonic() + 5
    while metrics(stack)["switchyard_kv_blocks_used"] > 0:
        assert time.monotonic() < deadline, "blocks not freed after the client left"
        time.sleep(0.05)


def test_overload_is_a_429_never_a_hang(stack):
    async def one() -> int:
        c = openai.AsyncOpenAI(base_url=f"{stack}/v1/", api_key="-", max_retries=0)
        try:
            await c.chat.completions.create(
                model="tgi",
                messages=[{"role": "user", "content": "Count."}],
                max_tokens=200,
                extra_body={"ignore_eos": True},
            )
            return 200
        except openai.RateLimitError as exc:
            assert exc.body["type"] == "rate_limit_exceeded" if isinstance(exc.body, dict) else True
            return 429

    async def burst() -> list[int]:
        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(MAX_CONCURRENT * 3))), 120)

    codes = asyncio.run(burst())
    assert codes.count(429) > 0 and codes.count(200) >= MAX_CONCURRENT
