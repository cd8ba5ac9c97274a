"""Request bodies that used to reach the router as an HTTP 500: each is a 400 naming its field.

Pure parser tests (no stack): the facade's JSON -> protobuf conversion on its own.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from facade.errors import ApiError, from_grpc
from facade.openai_chat import parse_chat
from facade.openai_completions import parse_completion
from facade.params import MAX_SEQUENCES, UINT32_MAX, token_ids
from facade.tgi import parse_generate as tgi_parameters

CHAT = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def rejected(parse, body: dict[str, Any]) -> ApiError:  # type: ignore[no-untyped-def]
    with pytest.raises(ApiError) as caught:
        parse(body)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"max_tokens": 2**32}, "max_tokens"),
        ({"max_completion_tokens": 10**12}, "max_completion_tokens"),
        ({"top_k": 2**40}, "top_k"),
        ({"min_tokens": 2**40}, "min_tokens"),
        ({"logit_bias": {"10000000000": 5}}, "logit_bias"),
    ],
)
def test_chat_numbers_beyond_their_protobuf_field(extra, param):
    assert rejected(parse_chat, {"messages": CHAT, **extra}).param == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]}, "messages[0].tool_call_id"),
        ({"messages": [*CHAT, {"role": "tool", "content": "sunny"}]}, f"messages[{len(CHAT)}].tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_call_id": 5}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": 5}]}, "messages[0].tool_calls"),
        (
            {"messages": CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": "f"}},
            "tool_choice.function",
        ),
    ],
)
def test_chat_wrong_json_types(body, param):
    assert rejected(parse_chat, body).param == param


@pytest.mark.parametrize(
    "prompt",
    [[1099511627776], [-1], [[5, 2**32]], [True, 3]],
)
def test_completion_token_ids_beyond_uint32_or_negative(prompt):
    assert rejected(parse_completion, {"prompt": prompt}).param.startswith("prompt")  # prompt[0] for a bool


def test_completion_sequences_per_request_are_bounded():
    error = rejected(parse_completion, {"prompt": ["x"] * 1000, "n": 128})
    assert error.param == "prompt" and str(MAX_SEQUENCES) in error.message
    assert len(parse_completion({"prompt": ["x"] * (MAX_SEQUENCES // 2), "n": 2}).requests) == MAX_SEQUENCES


@pytest.mark.parametrize(
    ("parameters", "param"),
    [({"max_new_tokens": -1}, "parameters.max_new_tokens"), ({"top_k": -5}, "parameters.top_k"),
     ({"top_n_tokens": -1}, "parameters.top_n_tokens"), ({"max_new_tokens": 2**32}, "parameters.max_new_tokens")],
)  # fmt: skip
def test_tgi_parameters_out_of_range(parameters, param):
    assert rejected(tgi_parameters, {"inputs": "hi", "parameters": parameters}).param == param


def test_detokenize_ids_must_fit_a_uint32():
    assert token_ids([0, 5, UINT32_MAX]) and not token_ids([UINT32_MAX + 1]) and not token_ids([-1])
    assert not token_ids([True]) and not token_ids("1, 2")


def test_valid_requests_still_pass():
    chat = parse_chat({"messages": CHAT, "max_tokens": UINT32_MAX, "top_k": -1, "logit_bias": {"7": 1}})
    assert chat.requests[0].parameters.max_new_tokens == UINT32_MAX and chat.requests[0].parameters.top_k == 0
    call = {"type": "function", "function": {"name": "f"}}
    assert parse_chat({"messages": CHAT, "tools": TOOLS, "tool_choice": call}).requests[0].chat.tool_choice_function


@pytest.mark.parametrize(
    ("code", "status"),
    [(grpc.StatusCode.CANCELLED, 503), (grpc.StatusCode.RESOURCE_EXHAUSTED, 429), (grpc.StatusCode.UNAVAILABLE, 503)],
)
def test_router_refusals_are_never_a_500(code, status):
    error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="dropped")
    assert from_grpc(error).status == status
