"""HTTP handlers: parse, call the router's public API, shape the answer."""

from __future__ import annotations

from typing import Any

import grpc
import orjson
from aiohttp import web

from facade import sse
from facade.errors import ApiError, from_grpc, invalid
from facade.openai_chat import FINISH_REASON, ChatResponder, parse_chat
from facade.state import METRICS, ROUTER, STARTED_AT
from protos import router_pb2 as pb


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from exc


async def chat_completions(request: web.Request) -> web.StreamResponse:
    chat = parse_chat(await read_json(request))
    router = request.app[ROUTER]
    responder = ChatResponder(chat.model)
    if not chat.stream:
        try:
            answer = await router.Generate(chat.message)
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc) from exc
        return json_response(responder.completion(answer))
    return await _stream_chat(request, router.GenerateStream(chat.message), responder, chat.include_usage)


async def _stream_chat(request: web.Request, call, responder: ChatResponder, include_usage: bool) -> web.StreamResponse:  # type: ignore[no-untyped-def]
    # Read the first message before answering 200, so a rejected request
    # still gets a proper HTTP error status.
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc) from exc
    response = await sse.open_stream(request)
    try:
        await sse.send(response, responder.chunk({"role": "assistant", "content": ""}))
        message = first
        while message is not grpc.aio.EOF:
            if message.text:
                await sse.send(response, responder.chunk({"content": message.text}))
            if message.finish_reason:
                await sse.send(response, responder.chunk({}, FINISH_REASON[message.finish_reason]))
                if include_usage:
                    await sse.send(response, responder.usage_chunk(message.usage))
            message = await call.read()
    except grpc.aio.AioRpcError as exc:
        # The stream has started: the error travels as an event, then the stream ends.
        await sse.send(response, from_grpc(exc).body())
    finally:
        call.cancel()  # a no-op when finished; frees the request when the client left
    await sse.send_done(response)
    return response


async def models(request: web.Request) -> web.Response:
    info = await _router_info(request)
    card = {
        "id": info.model_id,
        "object": "model",
        "created": request.app[STARTED_AT],
        "owned_by": "switchyard",
        "root": info.model_id,
        "max_model_len": info.max_total_tokens,
    }
    return json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    try:
        await request.app[ROUTER].Health(pb.HealthRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        raise ApiError(503, f"not ready: {exc.details()}", "service_unavailable", None, "unavailable") from exc
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """The facade's metrics followed by the router's (queue, batch, KV blocks, latencies)."""
    try:
        router_text = (await request.app[ROUTER].Metrics(pb.MetricsRequest(), timeout=10)).text.encode()
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc) from exc
    body = request.app[METRICS].exposition() + router_text
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _router_info(request: web.Request) -> pb.InfoResponse:
    try:
        return await request.app[ROUTER].Info(pb.InfoRequest(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc) from exc


ROUTES = [
    web.post("/v1/chat/completions", chat_completions),
    web.get("/v1/models", models),
    web.get("/health", health),
    web.get("/metrics", metrics),
]
