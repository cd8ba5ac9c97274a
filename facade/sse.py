"""Server-sent events, as OpenAI streams them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

import orjson
from aiohttp import web

from facade.errors import ApiError

T = TypeVar("T")


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    return response


async def send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + orjson.dumps(payload) + b"\n\n")


async def send_done(response: web.StreamResponse) -> None:
    await response.write(b"data: [DONE]\n\n")


async def guarded(response: web.StreamResponse, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """Passes items through; an error after the stream started becomes an SSE error event."""
    try:
        async for item in items:
            yield item
    except ApiError as exc:
        await send(response, exc.body())
