"""Structured outputs and tool calls that always parse, on SmolLM2-135M and on a tiny random model."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import running_stack

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
                },
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "address"],
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}
        },
        "required": ["tags"],
    },
    "enum": {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "minimum": 0, "maximum": 10},
        },
        "required": ["age", "score"],
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 30}},
            "required": ["timezone"],
        },
    },
}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def smollm(request):
    with running_stack({"MODEL_ID": ""}) as url:
        yield openai.OpenAI(base_url=f"{url}/v1/", api_key="-", max_retries=0, timeout=600), url


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_twenty_samples_at_temperature_one_validate(smollm, name):
    client, _ = smollm
    schema = SCHEMAS[name]
    out = client.chat.completions.create(
        model="tgi",
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
        temperature=1.0,
        seed=7,
        n=20,
        max_tokens=200,
    )
    assert len(out.choices) == 20
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_mode(smollm):
    client, _ = smollm
    out = client.chat.completions.create(
        model="tgi", messages=ASK, response_format={"type": "json_object"}, temperature=1.0, seed=3, n=4, max_tokens=120
    )
    for choice in out.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)


def _check_call(call, tools=TOOLS):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in schemas
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_required_and_named_tool_choice(smollm):
    client, _ = smollm
    out = client.chat.completions.create(model="tgi", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    for call in choice.message.tool_calls:
        _check_call(call)
    named = client.chat.completions.create(
        model="tgi",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        max_tokens=120,
    )
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    _check_call(call)


def test_streamed_tool_call_reassembles_to_the_non_streamed_one(smollm):
    client, _ = smollm
    kwargs = dict(model="tgi", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta if chunk.choices else None
        for piece in (delta.tool_calls or []) if delta else []:
            entry = calls.setdefault(piece.index, {"name": None, "arguments": "", "firsts": 0})
            if piece.id:
                entry["firsts"] += 1
                entry["name"] = piece.function.name
            entry["arguments"] += piece.function.arguments or ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in whole
    ]
    assert all(c["firsts"] == 1 for c in calls.values())  # id/type/name on the first delta only


def test_auto_and_multi_turn(smollm):
    client, _ = smollm
    auto = client.chat.completions.create(model="tgi", messages=ASK, tools=TOOLS, max_tokens=80, temperature=0)
    choice = auto.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            _check_call(call)
    else:
        assert choice.message.content
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]  # fmt: skip
    answer = client.chat.completions.create(
        model="tgi", messages=history, tools=TOOLS, tool_choice="none", max_tokens=30
    )
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    role: Literal["driver", "guard", "conductor"]


def test_openai_parse_helper(smollm):
    client, _ = smollm
    parsed = client.chat.completions.parse(
        model="tgi",
        messages=[{"role": "user", "content": "Invent a railway worker."}],
        response_format=Person,
        max_tokens=100,
    )
    assert isinstance(parsed.choices[0].message.parsed, Person)


def test_langchain_bind_tools_and_structured_output(smollm):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    _, url = smollm

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(model="tgi", base_url=f"{url}/v1/", api_key="-", temperature=0, max_tokens=100)
    message = llm.bind_tools([get_weather], tool_choice="required").invoke("Weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert isinstance(message.tool_calls[0]["args"]["city"], str)
    person = llm.with_structured_output(Person).invoke("Invent a railway worker.")
    assert isinstance(person, Person)


def test_tiny_random_model_outputs_still_parse(tiny_model_dir):
    with running_stack({"MODEL_ID": str(tiny_model_dir("qwen2"))}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1/", api_key="-", max_retries=0)
        schema = SCHEMAS["nested"]
        out = client.chat.completions.create(
            model="tgi",
            messages=[{"role": "user", "content": "JSON please"}],
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
            temperature=1.0,
            seed=1,
            n=20,
            max_tokens=200,
        )
        for choice in out.choices:
            jsonschema.validate(json.loads(choice.message.content), schema)
        calls = client.chat.completions.create(
            model="tgi",
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,  # a random model would keep appending calls until max_tokens
            max_tokens=300,
            temperature=1.0,
            seed=2,
        )
        assert calls.choices[0].finish_reason == "tool_calls"
        for call in calls.choices[0].message.tool_calls:
            _check_call(call)


@pytest.mark.parametrize("tool_format", ["llama3_json", "mistral"])
def test_configured_tool_call_format_streams_calls_and_no_markup(tiny_model_dir, tool_format):
    """TOOL_CALL_FORMAT: a Llama 3 or Mistral format on a model whose template names none."""
    env = {"MODEL_ID": str(tiny_model_dir("llama")), "TOOL_CALL_FORMAT": tool_format}
    with running_stack(env) as url:
        client = openai.OpenAI(base_url=f"{url}/v1/", api_key="-", max_retries=0)
        common = {"model": "tgi", "messages": ASK, "tools": TOOLS, "max_tokens": 300, "temperature": 1.0, "seed": 3}
        common |= {"tool_choice": "required", "parallel_tool_calls": False}  # a random model would go on talking
        out = client.chat.completions.create(**common)
        assert out.choices[0].finish_reason == "tool_calls" and len(out.choices[0].message.tool_calls) == 1
        _check_call(out.choices[0].message.tool_calls[0])
        chunks = list(client.chat.completions.create(**common, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        names = [
            t.function.name for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or [] if t.function.name
        ]
        assert names and content.strip() == "" and chunks[-1].choices[0].finish_reason == "tool_calls"
