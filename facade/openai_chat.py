"""``POST /v1/chat/completions``: OpenAI Chat Completions over the router's public API."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from facade import params, sse
from facade.choices import StreamSet, generate_all
from facade.errors import invalid
from facade.json_body import json_response, read_json
from facade.request_models import ChatCompletionRequest, fields_of, validate_body
from facade.state import ROUTER
from protos import router_pb2 as pb

SYSTEM_FINGERPRINT = "switchyard-0.1.0"
FINISH_REASON = {
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop",
    pb.FINISH_REASON_LENGTH: "length",
}
ROLES_WITH_TEXT = frozenset({"system", "developer", "user", "assistant", "tool"})

_FIELDS = fields_of(ChatCompletionRequest)


@dataclass(frozen=True)
class ChatRequest:
    model: str
    stream: bool
    include_usage: bool
    logprobs: bool
    requests: list[pb.GenerateRequest]  # one per choice


def parse_chat(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    params.check_fields(body, _FIELDS)
    validate_body(ChatCompletionRequest, body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' is required and must be a non-empty array", "messages")
    chat = pb.Chat(messages=[_message(i, m) for i, m in enumerate(messages)])
    _tools(body, chat)
    stream = params.typed(body, "stream", bool, False)
    p = params.parameters(body, "max_completion_tokens")
    p.response_format.CopyFrom(params.response_format(body.get("response_format")))
    logprobs = params.typed(body, "logprobs", bool, False)
    top = params.typed(body, "top_logprobs", int)
    if top is not None:
        if not logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        if not 0 <= top <= 20:
            raise invalid("'top_logprobs' must be between 0 and 20", "top_logprobs")
        p.top_n_tokens = top
    p.logprobs = logprobs
    n = params.choices_count(body)
    requests = [pb.GenerateRequest(chat=chat, parameters=choice) for choice in params.per_choice(p, n)]
    model = params.typed(body, "model", str, "tgi")
    return ChatRequest(model, stream, params.include_usage(body, stream), logprobs, requests)


def _message(i: int, m: Any) -> pb.ChatMessage:
    if not isinstance(m, dict):
        raise invalid(f"messages[{i}] must be an object", f"messages[{i}]")
    role = m.get("role")
    if not isinstance(role, str):
        raise invalid(f"messages[{i}].role is required and must be a string", f"messages[{i}].role")
    name = m.get("name") or ""
    if not isinstance(name, str):
        raise invalid(f"messages[{i}].name must be a string", f"messages[{i}].name")
    history = m.get("tool_calls") or []
    if not isinstance(history, list):
        raise invalid(f"messages[{i}].tool_calls must be an array", f"messages[{i}].tool_calls")
    calls = [_history_call(i, j, c) for j, c in enumerate(history)]
    content = m.get("content")
    if content is None and (calls or role == "assistant"):
        content = ""
    tool_call_id = m.get("tool_call_id") or ""
    if not isinstance(tool_call_id, str):
        raise invalid(f"messages[{i}].tool_call_id must be a string", f"messages[{i}].tool_call_id")
    return pb.ChatMessage(
        role=role, content=_content(i, content), name=name, tool_calls=calls, tool_call_id=tool_call_id
    )


def _history_call(i: int, j: int, call: Any) -> pb.ToolCall:
    where = f"messages[{i}].tool_calls[{j}]"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise invalid(f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}", where)
    arguments = function.get("arguments") or "{}"
    try:
        json.loads(arguments)
    except (TypeError, json.JSONDecodeError):
        raise invalid(f"{where}.function.arguments must be a JSON string", f"{where}.function.arguments") from None
    return pb.ToolCall(id=str(call.get("id") or ""), name=function["name"], arguments=arguments)


def _tools(body: dict, chat: pb.Chat) -> None:
    tools = params.typed(body, "tools", list, [])
    choice = body.get("tool_choice")
    if choice is not None and not tools:
        raise invalid("tool_choice is only allowed when tools are given", "tool_choice")
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise invalid(f"tools[{k}] must be {{'type': 'function', 'function': {{'name', ...}}}}", f"tools[{k}]")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid(
                f"tools[{k}].function.parameters must be a JSON schema object", f"tools[{k}].function.parameters"
            )
        chat.tools.append(
            pb.Tool(
                name=function["name"],
                description=str(function.get("description") or ""),
                parameters=json.dumps(parameters) if parameters is not None else "",
            )
        )
    chat.parallel_tool_calls = params.typed(body, "parallel_tool_calls", bool, True)
    if choice is None or choice == "auto":
        chat.tool_choice = pb.TOOL_CHOICE_MODE_AUTO
    elif choice == "none":
        chat.tool_choice = pb.TOOL_CHOICE_MODE_NONE
    elif choice == "required":
        chat.tool_choice = pb.TOOL_CHOICE_MODE_REQUIRED
    elif (
        isinstance(choice, dict)
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    ):
        chat.tool_choice = pb.TOOL_CHOICE_MODE_FUNCTION
        chat.tool_choice_function = choice["function"]["name"]
    elif isinstance(choice, str) and choice in {t.name for t in chat.tools}:
        # TGI also takes a bare function name.
        chat.tool_choice = pb.TOOL_CHOICE_MODE_FUNCTION
        chat.tool_choice_function = choice
    else:
        raise invalid(
            "tool_choice must be 'none', 'auto', 'required', a tool's name or {'type': 'function', ...}", "tool_choice"
        )


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
    raise invalid(f"messages[{i}].content must be a string or an array of text parts", f"messages[{i}].content")


def token_logprobs(tokens: Any) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries for router tokens."""
    return [
        {
            "token": t.text,
            "logprob": t.logprob,
            "bytes": list(t.text.encode()),
            "top_logprobs": [{"token": a.text, "logprob": a.logprob, "bytes": list(a.text.encode())} for a in t.top],
        }
        for t in tokens
    ]


class ChatResponder:
    """Builds the response objects of one chat completion."""

    def __init__(self, model: str, logprobs: bool):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def _logprobs(self, tokens: Any) -> dict[str, Any] | None:
        return {"content": token_logprobs(tokens), "refusal": None} if self.logprobs else None

    def completion(self, answers: list[pb.GenerateResponse]) -> dict[str, Any]:
        body = self._envelope("chat.completion")
        body["choices"] = [
            {
                "index": i,
                "message": _assistant_message(a),
                "logprobs": self._logprobs(a.tokens),
                "finish_reason": FINISH_REASON[a.finish_reason],
            }
            for i, a in enumerate(answers)
        ]
        body["usage"] = usage([a.usage for a in answers])
        return body

    def chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None = None, tokens: Any = ()) -> dict:
        body = self._envelope("chat.completion.chunk")
        logprobs = self._logprobs(tokens) if tokens else None
        body["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
        return body

    def usage_chunk(self, usages: list[pb.Usage]) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk")
        body["choices"] = []
        body["usage"] = usage(usages)
        return body


def _assistant_message(a: pb.GenerateResponse) -> dict[str, Any]:
    if not a.tool_calls:
        return {"role": "assistant", "content": a.text, "refusal": None}
    # Text the model wrote before its calls (a thought, "Let me check") stays as content.
    calls = [_call(c) for c in a.tool_calls]
    return {"role": "assistant", "content": a.text or None, "refusal": None, "tool_calls": calls}


def _call(c: pb.ToolCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def tool_call_deltas(calls: Any) -> list[dict[str, Any]]:
    """Stream deltas of finished calls: id, type and name first, then the arguments."""
    deltas = []
    for k, c in enumerate(calls):
        first = {"index": k, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
        deltas.append({"tool_calls": [first]})
        deltas.append({"tool_calls": [{"index": k, "function": {"arguments": c.arguments}}]})
    return deltas


def usage(usages: list[pb.Usage]) -> dict[str, Any]:
    # Every choice saw the same prompt: count it once, as OpenAI does.
    first = usages[0] if usages else pb.Usage()
    return usage_body(first.prompt_tokens, sum(u.completion_tokens for u in usages), first.cached_tokens)


def usage_body(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: prompt tokens served from the prefix cache (as vLLM reports)."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    chat = parse_chat(await read_json(request))
    router = request.app[ROUTER]
    responder = ChatResponder(chat.model, chat.logprobs)
    if not chat.stream:
        return json_response(responder.completion(await generate_all(router, chat.requests)))
    streams = StreamSet(router, chat.requests)
    await streams.start()
    response = await sse.open_stream(request)
    usages: dict[int, pb.Usage] = {}
    try:
        for i in range(len(chat.requests)):
            await sse.send(response, responder.chunk(i, {"role": "assistant", "content": ""}))
        async for i, message in streams.messages():
            if message.text or (chat.logprobs and message.tokens):
                await sse.send(response, responder.chunk(i, {"content": message.text}, tokens=message.tokens))
            if message.finish_reason:
                usages[i] = message.usage
                for delta in tool_call_deltas(message.tool_calls):
                    await sse.send(response, responder.chunk(i, delta))
                await sse.send(response, responder.chunk(i, {}, FINISH_REASON[message.finish_reason]))
        if chat.include_usage and len(usages) == len(chat.requests):
            await sse.send(response, responder.usage_chunk([usages[i] for i in sorted(usages)]))
    finally:
        streams.close()
    await sse.send_done(response)
    return response
