"""Server-sent events, as OpenAI (and TGI) stream them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from facade.errors import ApiError


@dataclass(frozen=True)
class StreamFormat:
    """How a route's stream carries an error that happens after the 200 was sent."""

    error_event: Callable[[ApiError], dict[str, Any]]
    #: Written after the error event too: clients wait for it to end the stream.
    done: bytes | None


OPENAI = StreamFormat(ApiError.body, b"data: [DONE]\n\n")
#: TGI's shape (huggingface_hub raises on it): {"error": message, "error_type": kind}.
TGI = StreamFormat(ApiError.tgi_body, None)

_OPEN_STREAM = web.RequestKey("open_stream", tuple)


async def open_stream(request: web.Request, stream_format: StreamFormat = OPENAI) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    request[_OPEN_STREAM] = (response, stream_format)
    return response


async def send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + orjson.dumps(payload) + b"\n\n")


async def send_done(response: web.StreamResponse) -> None:
    await response.write(b"data: [DONE]\n\n")


async def end_with_error(request: web.Request, error: ApiError) -> web.StreamResponse | None:
    """Ends the request's open stream with ``error`` as an event; None if no stream was opened.

    Once the status line is sent the event is the only way to tell the client, so
    every failure after ``open_stream`` (the router's, or a fault of ours) ends here.
    """
    opened = request.get(_OPEN_STREAM)
    if opened is None:
        return None
    response, stream_format = opened
    with contextlib.suppress(ConnectionError):  # the client may be gone already
        await send(response, stream_format.error_event(error))
        if stream_format.done:
            await response.write(stream_format.done)
    return response
