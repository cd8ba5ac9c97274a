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
from facade.request_models import (
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    NamedToolChoice,
    RequestModel,
    ToolCall,
    fields_of,
    validate_body,
)
from facade.state import ROUTER
from protos import router_pb2 as pb

SYSTEM_FINGERPRINT = "switchyard-0.1.0"
FINISH_REASON = {
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop",
    pb.FINISH_REASON_LENGTH: "length",
}

_FIELDS = fields_of(ChatCompletionRequest)


@dataclass(frozen=True)
class ChatRequest:
    model: str
    stream: bool
    include_usage: bool
    logprobs: bool
    requests: list[pb.GenerateRequest]  # one per choice
    #: Alternatives per token: of the output (top_logprobs) and of the prompt (prompt_logprobs, None: off).
    top_logprobs: int = 0
    prompt_logprobs: int | None = None


def parse_chat(body: Any) -> ChatRequest:
    if isinstance(body, dict):  # unknown fields are named before anything else
        params.check_fields(body, _FIELDS)
    req = validate_body(ChatCompletionRequest, body)
    if req.best_of not in (None, 1, req.n or 1):  # not in OpenAI's chat API (completions and /generate have it)
        raise invalid("best_of is not supported for chat completions; use n, or /v1/completions", "best_of")
    chat = pb.Chat(messages=[_message(i, m) for i, m in enumerate(req.messages)])
    _tools(req, chat)
    if req.chat_template_kwargs:
        chat.template_kwargs = json.dumps(req.chat_template_kwargs)
    p = params.parameters(req, req.max_completion_tokens or req.max_tokens)
    p.response_format.CopyFrom(params.response_format(_as_dict(req.response_format)))
    p.logprobs = bool(req.logprobs)
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        p.top_n_tokens = req.top_logprobs
    params.ask_prompt_logprobs(p, req.prompt_logprobs, bool(req.stream))
    model = req.model or ""  # an adapter's name selects it (router.proto, GenerateRequest.model)
    requests = [
        pb.GenerateRequest(chat=chat, parameters=choice, model=model) for choice in params.per_choice(p, req.n or 1)
    ]
    return ChatRequest(
        req.model or "tgi", bool(req.stream), params.include_usage(req), p.logprobs, requests,
        req.top_logprobs or 0, req.prompt_logprobs,
    )  # fmt: skip


def _as_dict(model: RequestModel | None) -> dict[str, Any] | None:
    """A format object as the shared converter (``params.response_format``) reads it."""
    return None if model is None else model.model_dump(by_alias=True, exclude_none=True)


def _message(i: int, m: ChatMessage) -> pb.ChatMessage:
    if m.role == "tool" and not m.tool_call_id:  # OpenAI's 400: a result must name the call it answers
        raise invalid(f"messages[{i}].tool_call_id is required for a tool message", f"messages[{i}].tool_call_id")
    calls = [_history_call(f"messages[{i}].tool_calls[{j}]", c) for j, c in enumerate(m.tool_calls or [])]
    content = m.content
    if content is None and (calls or m.role == "assistant"):
        content = ""
    return pb.ChatMessage(
        role=m.role,
        content=_content(i, content),
        name=m.name or "",
        tool_calls=calls,
        tool_call_id=m.tool_call_id or "",
    )


def _history_call(where: str, call: ToolCall) -> pb.ToolCall:
    arguments = call.function.arguments or "{}"
    try:
        json.loads(arguments)  # type: ignore[arg-type]  # an object is refused here: OpenAI sends JSON text
    except (TypeError, json.JSONDecodeError):
        raise invalid(f"{where}.function.arguments must be a JSON string", f"{where}.function.arguments") from None
    return pb.ToolCall(id=call.id or "", name=call.function.name, arguments=str(arguments))


def _tools(req: ChatCompletionRequest, chat: pb.Chat) -> None:
    tools = req.tools or []
    choice = req.tool_choice
    if choice is not None and not tools:
        raise invalid("tool_choice is only allowed when tools are given", "tool_choice")
    for k, tool in enumerate(tools):
        function = tool.function
        if not function.name:
            raise invalid(f"tools[{k}].function.name must not be empty", f"tools[{k}].function.name")
        parameters = json.dumps(function.parameters) if function.parameters is not None else ""
        chat.tools.append(pb.Tool(name=function.name, description=function.description or "", parameters=parameters))
    chat.parallel_tool_calls = req.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        chat.tool_choice = pb.TOOL_CHOICE_MODE_AUTO
    elif choice == "none":
        chat.tool_choice = pb.TOOL_CHOICE_MODE_NONE
    elif choice == "required":
        chat.tool_choice = pb.TOOL_CHOICE_MODE_REQUIRED
    elif isinstance(choice, NamedToolChoice):
        chat.tool_choice = pb.TOOL_CHOICE_MODE_FUNCTION
        chat.tool_choice_function = choice.function.name
    elif choice in {t.name for t in chat.tools}:
        # TGI also takes a bare function name.
        chat.tool_choice = pb.TOOL_CHOICE_MODE_FUNCTION
        chat.tool_choice_function = choice
    else:
        raise invalid(
            "tool_choice must be 'none', 'auto', 'required', a tool's name or {'type': 'function', ...}", "tool_choice"
        )


def _content(i: int, content: str | list[ContentPart] | None) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise invalid(f"messages[{i}].content must be a string or an array of text parts", f"messages[{i}].content")
    parts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise invalid(
                f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}",
                f"messages[{i}].content[{j}]",
            )
        parts.append(part.text)
    return "".join(parts)


def token_logprobs(tokens: Any, alternatives: int | None = None) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries for router tokens (``alternatives``: how many of each
    token's to show; all by default)."""
    return [
        {
            "token": t.text,
            "logprob": t.logprob,
            "bytes": list(t.text.encode()),
            "top_logprobs": [
                {"token": a.text, "logprob": a.logprob, "bytes": list(a.text.encode())} for a in t.top[:alternatives]
            ],
        }
        for t in tokens
    ]


class ChatResponder:
    """Builds the response objects of one chat completion."""

    def __init__(self, model: str, logprobs: bool, top_logprobs: int = 0, prompt_logprobs: int | None = None):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.prompt_logprobs = prompt_logprobs

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def _logprobs(self, tokens: Any) -> dict[str, Any] | None:
        return {"content": token_logprobs(tokens, self.top_logprobs), "refusal": None} if self.logprobs else None

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
        if self.prompt_logprobs is not None:  # vLLM's place for them: the response, not a choice
            body["prompt_logprobs"] = params.vllm_prompt_logprobs(answers[0].prompt_tokens, self.prompt_logprobs)
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
    message: dict[str, Any] = {"role": "assistant", "content": a.text, "refusal": None}
    if a.reasoning:  # vLLM's field, which LangChain's ChatDeepSeek and LiteLLM read
        message["reasoning_content"] = a.reasoning
    if a.tool_calls:
        # Text the model wrote before its calls (a thought, "Let me check") stays as content.
        message["content"] = a.text or None
        message["tool_calls"] = [_call(c) for c in a.tool_calls]
    return message


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
    body = usage_body(first.prompt_tokens, sum(u.completion_tokens for u in usages), first.cached_tokens)
    if reasoning := sum(u.reasoning_tokens for u in usages):
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return body


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
    responder = ChatResponder(chat.model, chat.logprobs, chat.top_logprobs, chat.prompt_logprobs)
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
            if message.reasoning:
                await sse.send(response, responder.chunk(i, {"reasoning_content": message.reasoning}))
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
