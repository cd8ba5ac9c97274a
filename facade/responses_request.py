"""OpenAI Responses API requests -> the chat the router serves, and the conversations kept for
``previous_response_id``.

A Responses body is translated into a Chat Completions body and parsed by the same
``parse_chat`` (one validation for both APIs); errors are renamed to the Responses
field they came from (``max_tokens`` -> ``max_output_tokens``, ``messages`` -> ``input``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from common.chat_roles import MESSAGE_ITEM_ROLES
from facade.errors import ApiError, invalid
from facade.openai_chat import ChatRequest, parse_chat
from facade.request_models import CreateResponse, fields_of, validate_body

#: Accepted (some only at a neutral value, below).
FIELDS = fields_of(CreateResponse)
#: Accepted only at these values: anything else would change the output and is not implemented.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "truncation": (None, "disabled"),
    "reasoning": (None, {}),
    "include": (None, []),
    "background": (None, False),
    "top_logprobs": (None, 0),
    "max_tool_calls": (None,),
    "prompt": (None,),
    "conversation": (None,),
}
_CHAT_TO_RESPONSES_PARAM = [
    (re.compile(r"^max_(completion_)?tokens$"), "max_output_tokens"),
    (re.compile(r"^response_format"), "text.format"),
    (re.compile(r"^messages(\[\d+\])?"), "input"),
]


@dataclass
class Conversation:
    """What a stored response contributes to a follow-up: the chat messages so far, and the Response object."""

    messages: list[dict[str, Any]]
    response: dict[str, Any]


@dataclass
class ResponseStore:
    """Responses kept for ``previous_response_id`` and ``GET /v1/responses/{id}``: in this facade's memory,
    the ``capacity`` most recent ones (least recently used out); lost on restart, not shared between replicas."""

    capacity: int = 1000
    _items: OrderedDict[str, Conversation] = field(default_factory=OrderedDict)

    def get(self, response_id: str) -> Conversation | None:
        found = self._items.get(response_id)
        if found is not None:
            self._items.move_to_end(response_id)
        return found

    def put(self, response_id: str, conversation: Conversation) -> None:
        self._items[response_id] = conversation
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None


@dataclass(frozen=True)
class ResponsesRequest:
    body: dict[str, Any]
    chat: ChatRequest
    #: The conversation as chat messages: earlier turns, instructions excluded, then this input.
    messages: list[dict[str, Any]]
    previous_response_id: str | None


def parse_responses(body: Any, store: ResponseStore) -> ResponsesRequest:
    req = _validate(body)
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        previous = store.get(req.previous_response_id)
        if previous is None:
            raise invalid(f"Previous response with id '{req.previous_response_id}' not found.", "previous_response_id")
        history = previous.messages
    messages = [*history, *input_messages(body["input"])]
    system = [{"role": "developer", "content": req.instructions}] if req.instructions else []
    chat_body: dict[str, Any] = {"messages": system + messages, "stream": bool(req.stream)}
    for key in ("temperature", "top_p", "seed", "parallel_tool_calls", "model"):
        if (value := getattr(req, key)) is not None:
            chat_body[key] = value
    if req.max_output_tokens is not None:
        chat_body["max_tokens"] = req.max_output_tokens
    _tools(req, chat_body)
    _text_format(req, chat_body)
    try:
        chat = parse_chat(chat_body)
    except ApiError as exc:
        exc.param = _responses_param(exc.param)
        raise
    return ResponsesRequest(body, chat, messages, req.previous_response_id)


def _validate(body: Any) -> CreateResponse:
    """Unknown and non-neutral fields named first, then the model's types."""
    if isinstance(body, dict):
        for key, value in body.items():
            if key in NEUTRAL and value not in NEUTRAL[key]:
                raise invalid(f"'{key}' is not supported yet", key)
            if key not in FIELDS:
                raise invalid(f"Unrecognized request argument supplied: {key}", key)
        if "input" not in body:
            raise invalid("'input' is required", "input")
    return validate_body(CreateResponse, body)


def input_messages(value: Any) -> list[dict[str, Any]]:
    """``input`` (a string, or message / function_call / function_call_output items) as chat messages."""
    if isinstance(value, str):
        if not value:
            raise invalid("'input' must not be empty", "input")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("'input' must be a string or a non-empty array of input items", "input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise invalid(f"input[{i}] must be an object", f"input[{i}]")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(i, item))
        elif kind == "function_call":
            _function_call(i, item, messages)
        elif kind == "function_call_output":
            messages.append(_function_output(i, item))
        else:
            raise invalid(f"input[{i}].type {kind!r} is not supported", f"input[{i}].type")
    return messages


def _message(i: int, item: dict[str, Any]) -> dict[str, Any]:
    role = item.get("role")
    if not isinstance(role, str) or role not in MESSAGE_ITEM_ROLES:
        raise invalid(f"input[{i}].role must be user, assistant, system or developer", f"input[{i}].role")
    return {"role": role, "content": _text(item.get("content"), f"input[{i}].content")}


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
                raise invalid(f"{param}[{k}]: only input_text and output_text parts are supported", f"{param}[{k}]")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"{param} must be a string or an array of text parts", param)


def _function_call(i: int, item: dict[str, Any], messages: list[dict[str, Any]]) -> None:
    """A call the model made earlier; consecutive calls join one assistant message, as in Chat Completions."""
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise invalid(f"input[{i}].{key} must be a string", f"input[{i}].{key}")
    call = {
        "id": item["call_id"],
        "type": "function",
        "function": {"name": item["name"], "arguments": item["arguments"]},
    }
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last.get("content"):
        last["tool_calls"].append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _function_output(i: int, item: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(item.get("call_id"), str):
        raise invalid(f"input[{i}].call_id must be a string", f"input[{i}].call_id")
    return {"role": "tool", "tool_call_id": item["call_id"], "content": _text(item.get("output"), f"input[{i}].output")}


def _tools(req: CreateResponse, chat_body: dict[str, Any]) -> None:
    converted = []
    for tool in req.tools or []:
        function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
        converted.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    if converted:
        chat_body["tools"] = converted
    choice = req.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is not None and (converted or choice != "auto"):
        chat_body["tool_choice"] = choice


def _text_format(req: CreateResponse, chat_body: dict[str, Any]) -> None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None:
        return
    if fmt.get("type") == "json_schema":
        spec = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        chat_body["response_format"] = {"type": "json_schema", "json_schema": spec}
    else:
        chat_body["response_format"] = fmt


def _responses_param(param: str | None) -> str | None:
    if param is None:
        return None
    for pattern, replacement in _CHAT_TO_RESPONSES_PARAM:
        if pattern.match(param):
            return pattern.sub(replacement, param, count=1)
    return param
