"""OpenAI's Responses API (``/v1/responses``) through the OpenAI Python and JavaScript SDKs, every
answer and streamed event checked against OpenAI's own schemas."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import running_stack
from tests.e2e.openai_schema import validate
from tests.js.run import run_script

KEY = "sk-responses"
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
]


@pytest.fixture(scope="module")
def stack(tiny_model_dir) -> Iterator[str]:
    with running_stack({"MODEL_ID": str(tiny_model_dir("llama")), "API_KEY": KEY}) as url:
        yield url


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack}/v1/", api_key=KEY, max_retries=0, timeout=120)


def _raw(stack: str, body: dict) -> httpx.Response:
    return httpx.post(f"{stack}/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def test_text_response_matches_chat_completions(stack, client):
    ask = "Tell me about railways."
    response = client.responses.create(model="tgi", input=ask, instructions="Be brief.", max_output_tokens=8,
                                       temperature=0)  # fmt: skip
    validate("Response", _raw(stack, {"model": "tgi", "input": ask, "max_output_tokens": 8}).json())
    chat = client.chat.completions.create(
        model="tgi",
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": ask}],
        max_tokens=8,
        temperature=0,
    )
    assert response.output_text == chat.choices[0].message.content  # one model, one validation path
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == chat.usage.prompt_tokens and response.usage.output_tokens == 8
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_streamed_events_follow_openai_and_add_up(stack, client):
    body = {"model": "tgi", "input": "Tell me about railways.", "max_output_tokens": 10, "temperature": 0}
    whole = client.responses.create(**body)
    events = list(client.responses.create(**body, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    raw = _raw(stack, {**body, "stream": True})
    payloads = [json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: ")]
    for payload in payloads:
        validate("ResponseStreamEvent", payload)
    assert [p["type"] for p in payloads] == types


def test_previous_response_id_continues_the_conversation(stack, client):
    first = client.responses.create(model="tgi", input="Name a railway.", max_output_tokens=4)
    second = client.responses.create(model="tgi", input="Where is it?", previous_response_id=first.id,
                                     max_output_tokens=4)  # fmt: skip
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens  # it saw the first turn
    with pytest.raises(openai.BadRequestError, match="not found"):
        client.responses.create(model="tgi", input="x", previous_response_id="resp_unknown")
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_function_tools_and_their_results(stack, client):
    called = client.responses.create(model="tgi", input="Weather in Paris?", tools=TOOLS, max_output_tokens=60,
                                     tool_choice={"type": "function", "name": "get_weather"},
                                     parallel_tool_calls=False)  # fmt: skip
    [call] = called.output
    assert call.type == "function_call" and call.name == "get_weather" and called.status == "completed"
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    answered = client.responses.create(
        model="tgi",
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
        max_output_tokens=5,
    )
    assert answered.output[0].type == "message"
    streamed = list(client.responses.create(model="tgi", input="Weather in Rome?", tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_output_tokens=60, stream=True))  # fmt: skip
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].name == "get_weather" and streamed[-1].type == "response.completed"


def test_json_schema_text_format(stack, client):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
              "additionalProperties": False}  # fmt: skip
    text = {"format": {"type": "json_schema", "name": "city", "schema": schema}}
    response = client.responses.create(model="tgi", input="A city, as JSON.", max_output_tokens=30, text=text)
    assert json.loads(response.output_text)["city"] in ("Paris", "Rome")


@pytest.mark.parametrize(
    ("body", "param"),
    [({"input": ""}, "input"), ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
     ({"input": [{"type": "input_image"}]}, "input[0].type"),
     ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
     ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"), ({"input": "x", "bogus": 1}, "bogus"),
     ({"model": "tgi"}, "input")],
)  # fmt: skip
def test_wrong_requests_are_400s_naming_the_field(stack, body, param):
    answer = _raw(stack, body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_openai_javascript_client_responses(stack):
    result = run_script("responses.mjs", f"{stack}/v1", KEY)
    assert result["streamed"] == result["whole"] and result["whole"] and result["status"] == "incomplete"
    assert result["events"][0] == "response.created" and result["events"][-1] == "response.incomplete"
