"""``POST /v1/responses`` (and ``GET``/``DELETE /v1/responses/{id}``): OpenAI's Responses API.

The request becomes one chat request to the router (``responses_request``); the answer
becomes a Response object (message and function_call output items), or, streamed, OpenAI's
typed events: response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta ... response.completed.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from facade import sse
from facade.choices import StreamSet, generate_all
from facade.errors import ApiError
from facade.json_body import json_response, read_json
from facade.responses_request import Conversation, ResponsesRequest, ResponseStore, parse_responses
from facade.state import ROUTER
from protos import router_pb2 as pb

STORE = web.AppKey("responses", ResponseStore)

#: The error event of a Responses stream (OpenAI's ResponseErrorEvent), for failures after it started.
RESPONSES_STREAM = sse.StreamFormat(
    lambda e: {"type": "error", "code": e.code or e.type, "message": e.message, "param": e.param,
               "sequence_number": 0},
    None,
)  # fmt: skip


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """The Response object of one request, filled in as the answer arrives."""

    def __init__(self, request: ResponsesRequest):
        self.request = request
        self.body: dict[str, Any] = {
            "id": _id("resp"),
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            "instructions": request.body.get("instructions"),
            "max_output_tokens": request.body.get("max_output_tokens"),
            "model": request.chat.model,
            "output": [],
            "parallel_tool_calls": request.body.get("parallel_tool_calls", True),
            "previous_response_id": request.previous_response_id,
            "reasoning": None,
            "store": request.body.get("store", True),
            "temperature": request.body.get("temperature", 1.0),
            "text": {"format": (request.body.get("text") or {}).get("format") or {"type": "text"}},
            "tool_choice": request.body.get("tool_choice", "auto"),
            "tools": [_tool_echo(t) for t in request.body.get("tools") or []],
            "top_p": request.body.get("top_p", 1.0),
            "truncation": "disabled",
            "metadata": request.body.get("metadata") or {},
        }  # "usage" appears once the answer is complete (OpenAI's schema has it an object, never null)

    @staticmethod
    def message_item(text: str, status: str) -> dict[str, Any]:
        return {"type": "message", "id": _id("msg"), "status": status, "role": "assistant",
                "content": [_text_part(text)]}  # fmt: skip

    @staticmethod
    def reasoning_item(text: str, status: str) -> dict[str, Any]:
        """A reasoning model's thinking (REASONING_PARSER), ahead of its answer."""
        return {"type": "reasoning", "id": _id("rs"), "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}  # fmt: skip

    @staticmethod
    def call_item(call: pb.ToolCall) -> dict[str, Any]:
        return {"type": "function_call", "id": _id("fc"), "call_id": call.id, "name": call.name,
                "arguments": call.arguments, "status": "completed"}  # fmt: skip

    def finish(self, finish_reason: int, usage: pb.Usage) -> None:
        if finish_reason == pb.FINISH_REASON_LENGTH:
            self.body["status"] = "incomplete"
            self.body["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            self.body["status"] = "completed"
        self.body["usage"] = {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        }

    def remember(self, store: ResponseStore, text: str, calls: list[pb.ToolCall]) -> None:
        """Keeps the conversation for a follow-up naming this response (unless ``store`` is false)."""
        if not self.body["store"]:
            return
        answer: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            answer["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
            ]
        store.put(self.body["id"], Conversation([*self.request.messages, answer], self.body))


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _tool_echo(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "name": tool.get("name"), "description": tool.get("description"),
            "parameters": tool.get("parameters"), "strict": tool.get("strict", False)}  # fmt: skip


async def create(request: web.Request) -> web.StreamResponse:
    parsed = parse_responses(await read_json(request), request.app[STORE])
    builder = ResponseBuilder(parsed)
    if parsed.chat.stream:
        return await _stream(request, parsed, builder)
    [answer] = await generate_all(request.app[ROUTER], parsed.chat.requests)
    if answer.reasoning:
        builder.body["output"].append(builder.reasoning_item(answer.reasoning, "completed"))
    if answer.text or not answer.tool_calls:
        status = "incomplete" if answer.finish_reason == pb.FINISH_REASON_LENGTH else "completed"
        builder.body["output"].append(builder.message_item(answer.text, status))
    builder.body["output"].extend(builder.call_item(c) for c in answer.tool_calls)
    builder.finish(answer.finish_reason, answer.usage)
    builder.remember(request.app[STORE], answer.text, list(answer.tool_calls))
    return json_response(builder.body)


class _Events:
    """Writes typed SSE events (``event:`` and ``data:``), numbering them."""

    def __init__(self, response: web.StreamResponse):
        self.response = response
        self.sequence = 0

    async def send(self, kind: str, **fields: Any) -> None:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        await self.response.write(f"event: {kind}\ndata: ".encode() + orjson.dumps(payload) + b"\n\n")


async def _stream(request: web.Request, parsed: ResponsesRequest, builder: ResponseBuilder) -> web.StreamResponse:
    streams = StreamSet(request.app[ROUTER], parsed.chat.requests)
    await streams.start()
    events = _Events(await sse.open_stream(request, RESPONSES_STREAM))
    body = builder.body
    await events.send("response.created", response=body)
    await events.send("response.in_progress", response=body)
    text, message, thinking = "", None, _Thinking(events, builder)
    try:
        async for _, m in streams.messages():
            if m.reasoning:
                await thinking.add(m.reasoning)
            if m.text:
                if message is None:
                    await thinking.close()
                    message = await _open_message(events, builder)
                text += m.text
                await events.send("response.output_text.delta", item_id=message.item["id"], output_index=message.index,
                                  content_index=0, delta=m.text, logprobs=[])  # fmt: skip
            if m.finish_reason:
                await thinking.close()
                if message is not None:
                    status = "incomplete" if m.finish_reason == pb.FINISH_REASON_LENGTH else "completed"
                    await _close_message(events, message, text, status)
                for call in m.tool_calls:
                    await _send_call(events, builder, call)
                builder.finish(m.finish_reason, m.usage)
                builder.remember(request.app[STORE], text, list(m.tool_calls))
                done = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
                await events.send(done, response=body)
    except ApiError as exc:
        body["status"], body["error"] = "failed", {"code": "server_error", "message": exc.message}
        await events.send("error", code=exc.code or exc.type, message=exc.message, param=exc.param)
        await events.send("response.failed", response=body)
    finally:
        streams.close()
    return events.response


class _Thinking:
    """The reasoning item of a streamed response: opened by the first thinking, closed when the
    answer starts or the response ends."""

    def __init__(self, events: _Events, builder: ResponseBuilder):
        self.events, self.builder = events, builder
        self.item: dict[str, Any] | None = None
        self.index = 0
        self.text = ""
        self.closed = False

    async def add(self, delta: str) -> None:
        if self.item is None:
            self.item = self.builder.reasoning_item("", "in_progress")
            self.item["content"] = []
            self.index = len(self.builder.body["output"])
            self.builder.body["output"].append(self.item)
            await self.events.send("response.output_item.added", output_index=self.index, item=self.item)
        self.text += delta
        await self.events.send("response.reasoning_text.delta", item_id=self.item["id"], output_index=self.index,
                               content_index=0, delta=delta)  # fmt: skip

    async def close(self) -> None:
        if self.item is None or self.closed:
            return
        self.closed = True
        self.item["content"] = [{"type": "reasoning_text", "text": self.text}]
        self.item["status"] = "completed"
        await self.events.send("response.reasoning_text.done", item_id=self.item["id"], output_index=self.index,
                               content_index=0, text=self.text)  # fmt: skip
        await self.events.send("response.output_item.done", output_index=self.index, item=self.item)


@dataclass
class _StreamedItem:
    """An output item being streamed, and its place in the response's output."""

    item: dict[str, Any]
    index: int


async def _open_message(events: _Events, builder: ResponseBuilder) -> _StreamedItem:
    """The answer's message item, opened after any reasoning item."""
    message = builder.message_item("", "in_progress")
    message["content"] = []
    index = len(builder.body["output"])
    builder.body["output"].append(message)
    await events.send("response.output_item.added", output_index=index, item=message)
    await events.send("response.content_part.added", item_id=message["id"], output_index=index, content_index=0,
                      part=_text_part(""))  # fmt: skip
    return _StreamedItem(message, index)


async def _close_message(events: _Events, message: _StreamedItem, text: str, status: str) -> None:
    item, index = message.item, message.index
    item["content"], item["status"] = [_text_part(text)], status
    await events.send("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                      text=text, logprobs=[])  # fmt: skip
    await events.send("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                      part=_text_part(text))  # fmt: skip
    await events.send("response.output_item.done", output_index=index, item=item)


async def _send_call(events: _Events, builder: ResponseBuilder, call: pb.ToolCall) -> None:
    item = builder.call_item(call)
    index = len(builder.body["output"])
    builder.body["output"].append(item)
    await events.send(
        "response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"}
    )
    await events.send("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                      delta=call.arguments)  # fmt: skip
    await events.send("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                      name=call.name, arguments=call.arguments)  # fmt: skip
    await events.send("response.output_item.done", output_index=index, item=item)


async def retrieve(request: web.Request) -> web.Response:
    found = request.app[STORE].get(request.match_info["response_id"])
    if found is None:
        raise _not_found(request.match_info["response_id"])
    return json_response(found.response)


async def delete(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    if not request.app[STORE].delete(response_id):
        raise _not_found(response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


def _not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id '{response_id}' not found.", "invalid_request_error", "response_id",
                    "not_found")  # fmt: skip
