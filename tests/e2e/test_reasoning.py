"""Reasoning models through the whole stack (issue 36): the thinking comes back as
``reasoning_content`` apart from ``content``, streamed and whole, read by the OpenAI client,
LangChain's ChatDeepSeek and LiteLLM, and as a reasoning item in the Responses API.

Two stacks on a tiny random Llama, one with a chat template in DeepSeek-R1's style (the prompt
opens the thinking) and one in Qwen3's (the model may open it). Random weights write no
``</think>`` of their own, so the split is checked against the raw output: with the tag's
tokens favoured by logit_bias, a seed whose raw completion (the same prompt's token ids through
/v1/completions, which leaves text as it is) holds the end tag gives a chat answer whose
thinking and content are exactly the two sides of it.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from langchain_deepseek import ChatDeepSeek

from support.reasoning_templates import REASONING_TEMPLATES, with_chat_template
from support.tiny_models import smollm_tokenizer
from tests.conftest import running_stack

HI = [{"role": "user", "content": "Which train should I take?"}]
END = "</think>"


def _stack(tiny_model_dir, tmp_path_factory, style: str):
    folder = with_chat_template(tiny_model_dir("llama"), REASONING_TEMPLATES[style], tmp_path_factory.mktemp(style))
    return running_stack({"MODEL_ID": str(folder), "MAX_TOTAL_TOKENS": "512"})


@pytest.fixture(scope="module")
def r1(tiny_model_dir, tmp_path_factory):
    with _stack(tiny_model_dir, tmp_path_factory, "deepseek_r1") as url:
        yield url


@pytest.fixture(scope="module")
def qwen3(tiny_model_dir, tmp_path_factory):
    with _stack(tiny_model_dir, tmp_path_factory, "qwen3") as url:
        yield url


def post(stack: str, path: str, body: Any) -> httpx.Response:
    r = httpx.post(f"{stack}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


def favour_end_tag() -> dict[str, float]:
    return {str(t): 10.0 for t in smollm_tokenizer().encode(END)}


def seed_with_end_tag(stack: str, prefix: str = "") -> tuple[int, str]:
    """A seed whose raw output (favouring the end tag's tokens) holds ``prefix`` then the end tag."""
    ids = post(stack, "/tokenize", {"messages": HI})
    for seed in range(200):
        body = {"prompt": ids.json()["tokens"], "max_tokens": 40, "seed": seed, "temperature": 1.0,
                "logit_bias": favour_end_tag()}  # fmt: skip
        raw = post(stack, "/v1/completions", body).json()["choices"][0]["text"]
        if raw.startswith(prefix) and END in raw[len(prefix) :]:
            return seed, raw
    raise AssertionError("no seed wrote the end tag")


def test_thinking_opened_by_the_prompt_is_split_from_the_answer(r1):
    seed, raw = seed_with_end_tag(r1)
    thinking, answer = raw.split(END, 1)
    client = openai.OpenAI(base_url=f"{r1}/v1/", api_key="none", max_retries=0)
    ask = dict(model="tgi", messages=HI, max_tokens=40, seed=seed, temperature=1.0, logit_bias=favour_end_tag())
    whole = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    message = whole.choices[0].message
    assert (message.model_extra or {}).get("reasoning_content") == thinking
    assert message.content == answer
    pieces = {"reasoning_content": "", "content": ""}
    for chunk in client.chat.completions.create(**ask, stream=True):  # type: ignore[call-overload]
        if chunk.choices:
            delta = chunk.choices[0].delta
            pieces["reasoning_content"] += (delta.model_extra or {}).get("reasoning_content") or ""
            pieces["content"] += delta.content or ""
    assert pieces == {"reasoning_content": thinking, "content": answer}


def test_cut_short_while_thinking(r1, monkeypatch):
    """max_tokens inside the thinking: finish_reason length, empty content, the thinking apart;
    as the OpenAI client, LangChain's ChatDeepSeek and LiteLLM read it."""
    whole = post(r1, "/v1/chat/completions", {"messages": HI, "max_tokens": 6, "temperature": 0}).json()
    answer = whole["choices"][0]
    assert answer["finish_reason"] == "length" and answer["message"]["content"] == ""
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6  # every token was thinking
    thinking = answer["message"]["reasoning_content"]
    assert thinking and END not in thinking
    chat = ChatDeepSeek(model="tgi", api_base=f"{r1}/v1", api_key="none", max_tokens=6, temperature=0)
    reply = chat.invoke("Which train should I take?")
    assert reply.content == "" and reply.additional_kwargs["reasoning_content"]
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list at import
    import litellm

    response: Any = litellm.completion(
        model="openai/tgi", api_base=f"{r1}/v1", api_key="none", messages=HI, max_tokens=6, temperature=0
    )
    assert response.choices[0].message.reasoning_content == thinking
    assert not response.choices[0].message.content


def test_responses_api_gives_a_reasoning_item(r1):
    body = {"input": "Which train should I take?", "max_output_tokens": 6, "temperature": 0}
    response = post(r1, "/v1/responses", body).json()
    output = response["output"]
    assert response["usage"]["output_tokens_details"]["reasoning_tokens"] == 6
    assert output[0]["type"] == "reasoning" and output[0]["content"][0]["text"]
    stream = httpx.post(f"{r1}/v1/responses", json={**body, "stream": True}, timeout=120).text
    events = [json.loads(line[5:]) for line in stream.splitlines() if line.startswith("data:")]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert deltas == output[0]["content"][0]["text"]
    assert events[-1]["response"]["output"][0]["type"] == "reasoning"


def test_a_structured_answer_follows_free_thinking(r1):
    """response_format constrains only what follows the thinking: the thinking is free text, the
    answer (once the end tag comes) is the schema's JSON."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    body = {"messages": HI, "max_tokens": 60, "temperature": 1.0, "logit_bias": favour_end_tag(),
            "response_format": fmt}  # fmt: skip
    for seed in range(40):
        choice = post(r1, "/v1/chat/completions", {**body, "seed": seed}).json()["choices"][0]
        message = choice["message"]
        if choice["finish_reason"] == "stop":  # the JSON is complete
            assert message["reasoning_content"]
            assert isinstance(json.loads(message["content"])["a"], int)
            return
    raise AssertionError("no answer after the thinking in 40 seeds")


def test_the_model_may_open_its_thinking_or_not(qwen3):
    """Qwen3's style: output that opens <think> is split; output that does not is all answer;
    enable_thinking=false puts an empty block in the prompt and the output is all answer."""
    seed, raw = seed_with_end_tag(qwen3)
    body = {"messages": HI, "max_tokens": 40, "seed": seed, "temperature": 1.0, "logit_bias": favour_end_tag()}
    message = post(qwen3, "/v1/chat/completions", body).json()["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"] == raw  # it did not open <think>
    off = {"messages": HI, "max_tokens": 8, "chat_template_kwargs": {"enable_thinking": False}}
    message = post(qwen3, "/v1/chat/completions", off).json()["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"]
