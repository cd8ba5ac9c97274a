"""Every client our users already use, as its documentation shows, against the running stack."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ROOT, free_port, running_stack
from tests.js.run import run_script

KEY = "sk-clients"
QUESTION = "Say something about trains."
# Bounded, so that the tiny random model's call ends within max_tokens.
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
}


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    with running_stack({"MODEL_ID": str(tiny_model_dir("llama")), "API_KEY": KEY}) as url:
        yield url


def test_openai_python_sync_and_async(stack):
    client = openai.OpenAI(base_url=f"{stack}/v1/", api_key=KEY)
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="tgi", messages=messages, max_tokens=12, temperature=0)
    parts = client.chat.completions.create(model="tgi", messages=messages, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts) == whole.choices[0].message.content

    async def run() -> tuple[str, str]:
        aclient = openai.AsyncOpenAI(base_url=f"{stack}/v1/", api_key=KEY)
        a = await aclient.chat.completions.create(model="tgi", messages=messages, max_tokens=12, temperature=0)
        s = await aclient.chat.completions.create(
            model="tgi", messages=messages, max_tokens=12, temperature=0, stream=True
        )
        return a.choices[0].message.content or "", "".join([c.choices[0].delta.content or "" async for c in s])

    a_whole, a_streamed = asyncio.run(run())
    assert a_whole == a_streamed == whole.choices[0].message.content


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_openai_javascript_client(stack):
    result = run_script("chat.mjs", f"{stack}/v1", KEY)
    assert result["streamed"] == result["whole"] and result["whole"]


def test_langchain_chat_openai(stack):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tgi", base_url=f"{stack}/v1/", api_key=KEY, max_tokens=12, temperature=0)
    answer = llm.invoke(QUESTION)
    streamed = "".join(chunk.content for chunk in llm.stream(QUESTION))
    assert answer.content and streamed == answer.content


def test_llamaindex_openai_like(stack):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(model="tgi", api_base=f"{stack}/v1", api_key=KEY, is_chat_model=True, max_tokens=12, temperature=0)
    completed = llm.complete(QUESTION)
    chatted = llm.chat([ChatMessage(role="user", content=QUESTION)])
    streamed = "".join(r.delta or "" for r in llm.stream_complete(QUESTION))
    assert completed.text and chatted.message.content == completed.text and streamed == completed.text


def test_litellm_chat_stream_tools_and_responses(stack, monkeypatch):
    """LiteLLM's OpenAI-compatible provider: chat (whole and streamed), a tool call, and the Responses API."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list at import
    import litellm

    target = {"model": "openai/tgi", "api_base": f"{stack}/v1", "api_key": KEY}
    messages = [{"role": "user", "content": QUESTION}]
    # 16 tokens: LiteLLM raises a smaller max_output_tokens to OpenAI's minimum, 16.
    whole = litellm.completion(**target, messages=messages, max_tokens=16, temperature=0)
    parts = litellm.completion(**target, messages=messages, max_tokens=16, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in parts)
    assert whole.choices[0].message.content and streamed == whole.choices[0].message.content
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}
    called = litellm.completion(
        **target, messages=messages, tools=[weather], tool_choice="required", parallel_tool_calls=False, max_tokens=200
    )
    assert called.choices[0].message.tool_calls[0].function.name == "get_weather"
    response = litellm.responses(**target, input=QUESTION, max_output_tokens=16, temperature=0)
    assert response.output[0].content[0].text == whole.choices[0].message.content
    # Cut at max_output_tokens, as OpenAI reports it.
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


def test_huggingface_inference_client(stack):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=f"{stack}/v1/", api_key=KEY)
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat_completion(messages, max_tokens=12, temperature=0)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat_completion(messages, max_tokens=12, temperature=0, stream=True)
    )
    assert streamed == whole.choices[0].message.content
    native = InferenceClient(model=stack, token=KEY)
    text = native.text_generation("Once upon a time", max_new_tokens=6)
    tokens = list(native.text_generation("Once upon a time", max_new_tokens=6, stream=True))
    assert text and "".join(tokens) == text
    details = native.text_generation("Once upon a time", max_new_tokens=6, details=True)
    assert details.generated_text == text and details.details.generated_tokens == 6


def test_tgi_text_generation_client(stack):
    """TGI's own Python client (``text-generation``): generate, stream, tokens' details, errors."""
    from text_generation import AsyncClient, Client
    from text_generation.errors import ValidationError

    headers = {"Authorization": f"Bearer {KEY}"}
    client = Client(stack, headers=headers, timeout=60)
    answer = client.generate("Once upon a time", max_new_tokens=6, top_n_tokens=2, decoder_input_details=False)
    assert answer.generated_text and answer.details.generated_tokens == 6
    assert len(answer.details.tokens) == 6 and len(answer.details.top_tokens[0]) == 2
    streamed = list(client.generate_stream("Once upon a time", max_new_tokens=6))
    assert "".join(r.token.text for r in streamed) == answer.generated_text
    assert streamed[-1].details.finish_reason.value == "length"
    with pytest.raises(ValidationError, match="max_new_tokens"):  # TGI's error shape, parsed by its client
        client.generate("Once upon a time", max_new_tokens=0)

    async def both() -> tuple[str, str]:
        aclient = AsyncClient(stack, headers=headers, timeout=60)
        whole = await aclient.generate("Once upon a time", max_new_tokens=6)
        parts = [r.token.text async for r in aclient.generate_stream("Once upon a time", max_new_tokens=6)]
        return whole.generated_text, "".join(parts)

    whole, joined = asyncio.run(both())
    assert whole == joined == answer.generated_text
    tokens = httpx.post(f"{stack}/tokenize", json={"inputs": "Hello railway world"}, headers=headers).json()
    assert [t["text"] for t in tokens] == ["Hello", " railway", " world"]
    assert tokens[1]["start"] == 5 and tokens[1]["stop"] == 13 and all(isinstance(t["id"], int) for t in tokens)
    bad = httpx.post(f"{stack}/generate", json={"inputs": ""}, headers=headers)
    assert bad.status_code == 400 and bad.json() == {
        "error": "'inputs' must be a non-empty string",
        "error_type": "validation",
    }


def test_models_retrieve(stack):
    client = openai.OpenAI(base_url=f"{stack}/v1/", api_key=KEY, max_retries=0)
    served = client.models.list().data[0].id
    assert client.models.retrieve("tgi").id == "tgi"
    assert client.models.retrieve(served).root == served
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_facade_without_router_is_503_not_500(tmp_path: Path):
    port = free_port()
    dead_router = f"unix://{tmp_path / 'nobody.sock'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "facade", "--port", str(port), "--hostname", "127.0.0.1", "--router", dead_router],
        cwd=ROOT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                health = httpx.get(f"{url}/health", timeout=10)
                break
            except httpx.ConnectError:
                import time

                time.sleep(0.1)
        assert health.status_code == 503
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    finally:
        proc.terminate()
        proc.wait(10)
