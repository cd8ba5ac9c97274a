"""The OpenAI and TGI API surface, parameter by parameter, with OpenAI's own schemas as the judge.

One stack (tiny random Llama, fp32) with an API key, CORS and a payload limit.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.conftest import running_stack
from tests.e2e.openai_schema import validate

KEY = "sk-switchyard-test"
ORIGIN = "https://app.example"
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "Say something about railways."}]


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    env = {
        "MODEL_ID": str(tiny_model_dir("llama")),
        "API_KEY": KEY,
        "CORS_ALLOW_ORIGIN": ORIGIN,
        "PAYLOAD_LIMIT": "200000",
        "MAX_TOTAL_TOKENS": "1024",
    }
    with running_stack(env) as url:
        yield url


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack}/v1/", api_key=KEY, max_retries=0)


def post(stack: str, path: str, body: Any, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{stack}{path}", json=body, headers={**AUTH, **(headers or {})}, timeout=120)


def sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.text.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def chat(stack: str, **body: Any) -> dict:
    r = post(stack, "/v1/chat/completions", {"model": "tgi", "messages": HI, "max_tokens": 8, **body})
    assert r.status_code == 200, r.text
    payload = r.json()
    validate("CreateChatCompletionResponse", payload)
    ChatCompletion.model_validate(payload)
    return payload


def chat_stream(stack: str, **body: Any) -> list[dict]:
    r = post(stack, "/v1/chat/completions", {"model": "tgi", "messages": HI, "max_tokens": 8, "stream": True, **body})
    assert r.status_code == 200, r.text
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        validate("CreateChatCompletionStreamResponse", e)
        ChatCompletionChunk.model_validate(e)
    return events[:-1]


# --- chat completions: parameters ------------------------------------------------


def test_response_envelope(stack):
    a = chat(stack, model="my-alias", temperature=0)
    b = chat(stack, model="my-alias", temperature=0)
    assert a["id"] != b["id"] and a["id"].startswith("chatcmpl-")
    assert a["model"] == "my-alias" and a["system_fingerprint"] and a["created"] > 0
    u = a["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] <= 8


def test_content_parts_roles_and_names(stack):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "name": "ana",
            "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
        },
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again?"},
    ]
    chat(stack, messages=messages, temperature=0)


def test_max_completion_tokens_wins(stack):
    out = chat(stack, max_tokens=3, max_completion_tokens=5, temperature=0, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 5 and out["choices"][0]["finish_reason"] == "length"


def test_top_p_one_and_extras_are_accepted(stack):
    chat(stack, temperature=0.7, top_p=1.0, top_k=20, min_p=0.05, repetition_penalty=1.1, typical_p=0.95, seed=3)
    chat(stack, top_k=-1, min_tokens=2, user="u-1", metadata={"a": "b"}, store=False, service_tier="auto")


def test_seed_reproducible_while_busy(stack):
    import threading

    want = chat(stack, temperature=1.0, seed=11, max_tokens=12)["choices"][0]["message"]["content"]
    noise = [threading.Thread(target=chat, args=(stack,), kwargs={"max_tokens": 30}) for _ in range(3)]
    for t in noise:
        t.start()
    got = chat(stack, temperature=1.0, seed=11, max_tokens=12)["choices"][0]["message"]["content"]
    for t in noise:
        t.join()
    assert got == want


def test_n_choices_each_indexed_and_distinct_with_a_seed(stack):
    out = chat(stack, n=3, temperature=1.0, seed=5, max_tokens=12)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in out["choices"]}) > 1
    events = chat_stream(stack, n=2, temperature=1.0, seed=5, max_tokens=6)
    finished = {e["choices"][0]["index"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]}
    assert finished == {0, 1}


def test_logit_bias_forces_a_token(stack):
    forced = 1000
    out = chat(stack, logit_bias={str(forced): 100}, temperature=0, logprobs=True, max_tokens=4, ignore_eos=True)
    tokens = out["choices"][0]["logprobs"]["content"]
    assert len(tokens) == 4 and len({t["token"] for t in tokens}) == 1


def test_frequency_and_presence_penalties_change_repetitive_output(stack):
    favoured = 1000  # biased up so that plain greedy decoding repeats it

    def repeats(**kw: Any) -> int:
        out = chat(stack, temperature=0, logprobs=True, max_tokens=30, ignore_eos=True, logit_bias={favoured: 8}, **kw)
        tokens = [t["token"] for t in out["choices"][0]["logprobs"]["content"]]
        return max(tokens.count(t) for t in tokens)

    plain = repeats()
    assert plain > 10
    assert repeats(presence_penalty=2.0, frequency_penalty=2.0) < plain
    assert repeats(frequency_penalty=2.0) < plain


def test_logprobs_and_top_logprobs(stack):
    out = chat(stack, temperature=0, logprobs=True, top_logprobs=3)
    content = out["choices"][0]["logprobs"]["content"]
    assert content
    for t in content:
        assert t["logprob"] <= 0 and t["bytes"] == list(t["token"].encode())
        tops = [a["logprob"] for a in t["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert abs(t["logprob"] - tops[0]) < 1e-4  # greedy picks the most likely
    events = chat_stream(stack, temperature=0, logprobs=True, top_logprobs=2)
    streamed = [t for e in events for c in e["choices"] if c.get("logprobs") for t in c["logprobs"]["content"]]
    assert [t["token"] for t in streamed] == [t["token"] for t in content]


def test_stream_shape_and_usage(stack):
    events = chat_stream(stack, temperature=0, stream_options={"include_usage": True})
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0


def test_stop_list(stack):
    text = chat(stack, temperature=0, max_tokens=16)["choices"][0]["message"]["content"]
    out = chat(stack, temperature=0, max_tokens=16, stop=[text[4:7], "zzzz"])
    assert out["choices"][0]["message"]["content"] == text[: text.index(text[4:7])]


# --- other routes -----------------------------------------------------------------


def test_completions_prompt_forms_echo_logprobs_and_stream(stack, client):
    one = client.completions.create(model="tgi", prompt="Once upon a time", max_tokens=5, temperature=0)
    validate("CreateCompletionResponse", one.model_dump(exclude_unset=True))
    assert one.choices[0].text and one.object == "text_completion"
    many = client.completions.create(model="tgi", prompt=["a", "b"], max_tokens=3, n=2, seed=1)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    ids = client.completions.create(model="tgi", prompt=[504, 3059, 253], max_tokens=3, temperature=0)
    assert ids.choices[0].text is not None
    echo = client.completions.create(
        model="tgi", prompt="Once upon a time", max_tokens=3, echo=True, logprobs=2, temperature=0
    )
    assert echo.choices[0].text.startswith("Once upon a time")
    lp = echo.choices[0].logprobs
    # The echoed prompt's 4 tokens come first, the first without a logprob (nothing precedes it).
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4 + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and "".join(lp.tokens[:4]) == "Once upon a time"
    chunks = list(
        client.completions.create(model="tgi", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == one.choices[0].text


def test_models_route(stack):
    r = httpx.get(f"{stack}/v1/models", headers=AUTH)
    validate("ListModelsResponse", r.json())
    card = r.json()["data"][0]
    assert card["root"] and card["max_model_len"] == 1024 and card["owned_by"]


def test_tokenize_and_detokenize(stack):
    t = post(stack, "/tokenize", {"model": "tgi", "prompt": "Hello world"}).json()
    assert t["count"] == len(t["tokens"]) > 0 and t["max_model_len"] == 1024
    assert post(stack, "/detokenize", {"model": "tgi", "tokens": t["tokens"]}).json()["prompt"] == "Hello world"
    c = post(stack, "/tokenize", {"model": "tgi", "messages": HI}).json()
    assert c["count"] > t["count"]


def test_tgi_native_routes(stack):
    g = post(stack, "/generate", {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 5, "details": True}})
    body = g.json()
    assert g.status_code == 200 and body["details"]["generated_tokens"] == len(body["details"]["tokens"])
    assert body["details"]["finish_reason"] in ("length", "eos_token", "stop_sequence")
    s = post(stack, "/generate_stream", {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 5}})
    events = sse_events(s)
    assert events[-1]["generated_text"] == body["generated_text"] and events[-1]["details"]["finish_reason"]
    assert all(e["generated_text"] is None for e in events[:-1])
    compat = post(stack, "/", {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 5}}).json()
    assert compat == [{"generated_text": body["generated_text"]}]  # a one-element list, as TGI answers
    info = httpx.get(f"{stack}/info", headers=AUTH).json()
    assert info["max_total_tokens"] == 1024 and info["model_id"]


def test_openapi_document_lists_every_route(stack):
    doc = httpx.get(f"{stack}/openapi.json", headers=AUTH).json()
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/generate", "/generate_stream",
                 "/tokenize", "/detokenize", "/info", "/health", "/metrics"):  # fmt: skip
        assert path in doc["paths"], path


# --- errors, limits, auth ------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"n": 0}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}]},
            "tools[0].function.parameters",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"temperature": "hot"}, "temperature"),
        ({"no_such_thing": 1}, "no_such_thing"),
    ],
)
def test_invalid_values_are_400_naming_the_param(stack, patch, param):
    r = post(stack, "/v1/chat/completions", {"model": "tgi", "messages": HI, **patch})
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["param"] == param


def test_context_overflow_uses_openai_wording(stack):
    r = post(stack, "/v1/chat/completions", {"messages": HI, "max_tokens": 1020})
    assert r.status_code == 400
    assert "maximum context length is 1024 tokens" in r.json()["error"]["message"]


def test_auth(stack):
    assert httpx.post(f"{stack}/v1/chat/completions", json={"messages": HI}).status_code == 401
    wrong = httpx.post(f"{stack}/v1/chat/completions", json={"messages": HI}, headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{stack}/health").status_code == 200  # open
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack}/v1/", api_key="wrong", max_retries=0).models.list()


def test_404_413_and_cors(stack):
    r = httpx.get(f"{stack}/v2/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["message"]
    big = post(stack, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 300_000}]})
    assert big.status_code == 413 and big.json()["error"]["type"]
    pre = httpx.options(
        f"{stack}/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == ORIGIN
    streamed = post(
        stack, "/v1/chat/completions", {"messages": HI, "max_tokens": 2, "stream": True}, {"Origin": ORIGIN}
    )
    assert streamed.headers["access-control-allow-origin"] == ORIGIN
    other = post(stack, "/v1/chat/completions", {"messages": HI, "max_tokens": 2}, {"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
