"""The whole path, through real processes: HTTP -> facade -> router -> shard.

A tiny random Llama (with SmolLM2's tokenizer and chat template) in fp32 is
served by ``python -m launcher``; transformers' generate on the same weights is
the oracle.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import running_stack

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def stack(tiny_llama):
    with running_stack({"MODEL_ID": str(tiny_llama)}) as url:
        yield url


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question}]


def oracle_text(model_dir, messages, max_new_tokens: int) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    new = out[0, len(ids) :].tolist()
    if 2 in new:  # the model's end-of-sequence token
        new = new[: new.index(2)]
    return tok.decode(new, skip_special_tokens=True)


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1/", api_key="-")


def test_greedy_matches_transformers(stack, tiny_llama):
    messages = chat("Why is open-source software important?")
    answer = client(stack).chat.completions.create(model="tgi", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].message.content == oracle_text(tiny_llama, messages, MAX_TOKENS)
    assert answer.model == "tgi"
    assert answer.id.startswith("chatcmpl-")
    assert answer.usage.completion_tokens <= MAX_TOKENS
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_stream_and_non_stream_agree(stack):
    messages = chat("Tell me about trains.")
    c = client(stack)
    whole = c.chat.completions.create(model="tgi", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="tgi",
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_two_concurrent_streams_share_a_batch(stack, tiny_llama):
    """The second stream starts before the first ends, and both are correct."""
    questions = ["What is a shard?", "Name three colours."]
    lengths = [400, 64]
    events: dict[int, list[float]] = {0: [], 1: []}
    texts: dict[int, str] = {}
    first_started = asyncio.Event()

    async def consume(i: int) -> None:
        if i == 1:
            await first_started.wait()  # the first stream is generating
        c = openai.AsyncOpenAI(base_url=f"{stack}/v1/", api_key="-")
        parts = []
        stream = await c.chat.completions.create(
            model="tgi",
            messages=chat(questions[i]),
            max_tokens=lengths[i],
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            events[i].append(time.monotonic())
            parts.append(chunk.choices[0].delta.content or "")
            if len(parts) == 3:
                first_started.set()
        texts[i] = "".join(parts)

    async def both() -> None:
        await asyncio.gather(consume(0), consume(1))

    asyncio.run(both())
    # Interleaved: the second stream started and finished while the first was still streaming.
    assert events[0][0] < events[1][0] < events[1][-1] < events[0][-1]
    for i, q in enumerate(questions):
        assert texts[i] == oracle_text_ignore_eos(tiny_llama, chat(q), lengths[i])


def oracle_text_ignore_eos(model_dir, messages, max_new_tokens: int) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.encode(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


def test_bad_input_gets_openai_errors_and_server_keeps_serving(stack):
    status, body = post(stack, {"model": "tgi"})
    assert status == 400 and body["error"]["param"] == "messages"
    request = urllib.request.Request(f"{stack}/v1/chat/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    assert set(json.loads(err.value.read())["error"]) == {"message", "type", "param", "code"}
    status, body = post(stack, {"messages": chat("word " * 3000), "max_tokens": 5})
    assert status == 400 and "maximum" in body["error"]["message"]
    status, body = post(stack, {"messages": chat("hi"), "max_tokens": 4000})
    assert status == 400 and "context length" in body["error"]["message"]
    status, body = post(stack, {"messages": [{"role": "wizard", "content": "hi"}]})
    assert status == 400 and body["error"]["param"] == "messages[0].role"
    status, body = post(stack, {"messages": chat("hi"), "temperature": 5})
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = post(stack, {"messages": chat("hi"), "frobnicate": 1})
    assert status == 400 and body["error"]["param"] == "frobnicate"
    # ... and still serving.
    status, body = post(stack, {"messages": chat("hi"), "max_tokens": 3})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_sequence_is_not_returned(stack):
    c = client(stack)
    free = c.chat.completions.create(model="tgi", messages=chat("Count."), max_tokens=MAX_TOKENS, temperature=0)
    text = free.choices[0].message.content
    assert len(text) > 6
    stop = text[3:6]
    cut = c.chat.completions.create(
        model="tgi", messages=chat("Count."), max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(stack):
    c = client(stack)
    kwargs = dict(model="tgi", messages=chat("Write a word."), max_tokens=MAX_TOKENS, temperature=1.0, seed=42)
    first, second = (c.chat.completions.create(**kwargs).choices[0].message.content for _ in range(2))
    assert first == second


def test_models_and_health(stack):
    models = client(stack).models.list()
    assert len(models.data) == 1 and models.data[0].object == "model"
    with urllib.request.urlopen(f"{stack}/health", timeout=5) as r:
        assert r.status == 200


def test_cancelled_stream_frees_the_server(stack):
    """A client that disconnects mid-stream does not keep the batch busy."""
    c = client(stack)
    stream = c.chat.completions.create(
        model="tgi", messages=chat("Go on."), max_tokens=1000, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    done = threading.Event()
    t0 = time.monotonic()
    answer = c.chat.completions.create(model="tgi", messages=chat("hi"), max_tokens=3)
    done.set()
    assert answer.choices[0].message.content is not None
    assert time.monotonic() - t0 < 30
