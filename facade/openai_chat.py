"""OpenAI Chat Completions JSON <-> router protobuf."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from facade.errors import invalid
from protos import router_pb2 as pb

SYSTEM_FINGERPRINT = "switchyard-0.1.0"

#: Accepted and passed on (or validated to a value we honour).
_SUPPORTED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "n",
        "top_k",
        "ignore_eos",
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
        "top_logprobs",
    }
)
#: Purely informational: accepted, change nothing.
_INFORMATIONAL = frozenset({"user", "metadata", "store", "service_tier"})
#: Values of not-yet-supported parameters that mean "off", so clients sending defaults work.
_NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "n": 1}

FINISH_REASON = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    stream: bool
    include_usage: bool
    message: pb.GenerateRequest


def parse_chat(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    _check_keys(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' is required and must be a non-empty array", "messages")
    chat = pb.Chat(messages=[_message(i, m) for i, m in enumerate(messages)])
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    model = _typed(body, "model", str, "tgi")
    return ChatRequest(model, stream, include_usage, pb.GenerateRequest(chat=chat, parameters=_parameters(body)))


def _check_keys(body: dict) -> None:
    for key, value in body.items():
        if key in _INFORMATIONAL:
            continue
        if key not in _SUPPORTED:
            raise invalid(f"Unrecognized request argument supplied: {key}", key)
        if key in _NEUTRAL and value is not None and value != _NEUTRAL[key]:
            raise invalid(f"'{key}' = {value!r} is not supported yet; it must be {_NEUTRAL[key]!r}", key)
        if key == "top_logprobs" and value:
            raise invalid("'top_logprobs' is not supported yet", key)


def _message(i: int, m: Any) -> pb.ChatMessage:
    if not isinstance(m, dict):
        raise invalid(f"messages[{i}] must be an object", f"messages[{i}]")
    role = m.get("role")
    if not isinstance(role, str):
        raise invalid(f"messages[{i}].role is required and must be a string", f"messages[{i}].role")
    name = m.get("name") or ""
    if not isinstance(name, str):
        raise invalid(f"messages[{i}].name must be a string", f"messages[{i}].name")
    return pb.ChatMessage(role=role, content=_content(i, m.get("content")), name=name)


def _content(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(
                    f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}",
                    f"messages[{i}].content[{j}]",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(
        f"messages[{i}].content must be a string or an array of text parts",
        f"messages[{i}].content",
    )


def _typed(body: dict, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is never a number here.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise invalid(f"'{key}' must be of type {names}, got {type(value).__name__}", key)
    return value


def _parameters(body: dict) -> pb.GenerationParameters:
    p = pb.GenerationParameters(temperature=float(_typed(body, "temperature", (int, float), 1.0)))
    if (top_p := _typed(body, "top_p", (int, float), None)) is not None:
        p.top_p = float(top_p)
    if (top_k := _typed(body, "top_k", int, None)) is not None:
        if top_k < 0:
            raise invalid("'top_k' must be >= 0", "top_k")
        p.top_k = top_k
    if (seed := _typed(body, "seed", int, None)) is not None:
        p.seed = seed % (1 << 64)
    max_tokens = _typed(body, "max_completion_tokens", int, None) or _typed(body, "max_tokens", int, None)
    if max_tokens is not None:
        if max_tokens < 1:
            raise invalid("'max_tokens' must be at least 1", "max_tokens")
        p.max_new_tokens = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        p.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        p.stop.extend(stop)
    elif stop is not None:
        raise invalid("'stop' must be a string or an array of strings", "stop")
    p.ignore_eos = _typed(body, "ignore_eos", bool, False)
    return p


class ChatResponder:
    """Builds the response objects of one chat completion."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def completion(self, answer: pb.GenerateResponse) -> dict[str, Any]:
        body = self._envelope("chat.completion")
        body["choices"] = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "logprobs": None,
                "finish_reason": FINISH_REASON[answer.finish_reason],
            }
        ]
        body["usage"] = usage(answer.usage)
        return body

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        return body

    def usage_chunk(self, u: pb.Usage) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk")
        body["choices"] = []
        body["usage"] = usage(u)
        return body


def usage(u: pb.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }
