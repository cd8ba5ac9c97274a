"""``POST /v1/embeddings`` in OpenAI's shape: one router Embed call per input."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

import grpc
from aiohttp import web

from facade.errors import from_grpc, invalid
from facade.json_body import json_response, read_json
from facade.lora import served_adapters
from facade.params import MAX_SEQUENCES, token_ids, truncation
from facade.request_models import EmbeddingRequest, fields_of, validate_body
from facade.state import ROUTER
from protos import router_pb2 as pb

_FIELDS = fields_of(EmbeddingRequest)


def parse_embeddings(body: Any) -> tuple[EmbeddingRequest, list[pb.EmbedRequest]]:
    """The body and one router request per input (a text, or a list of token ids)."""
    for key in body if isinstance(body, dict) else ():
        if key not in _FIELDS:
            raise invalid(f"Unrecognized request argument supplied: {key}", key)
    req = validate_body(EmbeddingRequest, body)
    inputs = _inputs(req.input)
    if len(inputs) > MAX_SEQUENCES:
        raise invalid(f"at most {MAX_SEQUENCES} inputs per request, got {len(inputs)}", "input")
    requests = []
    for item in inputs:
        message = pb.EmbedRequest(text=item) if isinstance(item, str) else pb.EmbedRequest(ids=pb.TokenIds(ids=item))
        message.dimensions = req.dimensions or 0
        if req.normalize is not None:
            message.normalize = req.normalize
        if req.truncate_prompt_tokens is not None:
            message.truncate = truncation(req.truncate_prompt_tokens)
        message.priority = req.priority or 0
        requests.append(message)
    return req, requests


def _inputs(given: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(given, str):
        items: list[str | list[int]] = [given]
    elif given and all(isinstance(x, int) for x in given):
        items = [list(given)]  # type: ignore[arg-type]
    else:
        items = list(given)  # type: ignore[arg-type]
    if not items:
        raise invalid("'input' must not be empty", "input")
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise invalid(f"input[{i}] must not be an empty string", f"input[{i}]")
        elif not item or not token_ids(item):
            raise invalid(f"input[{i}] must be a non-empty list of token ids", f"input[{i}]")
    return items


def _encoded(vector: Any, encoding: str | None) -> list[float] | str:
    if encoding == "base64":  # what the OpenAI Python client asks for by default
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return list(vector)


async def embeddings(request: web.Request) -> web.Response:
    req, messages = parse_embeddings(await read_json(request))
    if req.model and req.model != "tgi" and req.model in {a.name for a in await served_adapters(request)}:
        # Never answered by the base model in the adapter's name.
        raise invalid(f"'{req.model}' is a LoRA adapter: embeddings are the base model's only", "model")
    router = request.app[ROUTER]
    calls = [router.Embed(m) for m in messages]
    try:
        answers = list(await asyncio.gather(*calls))
    except grpc.aio.AioRpcError as exc:
        for call in calls:
            call.cancel()
        raise from_grpc(exc) from exc
    tokens = sum(a.prompt_tokens for a in answers)
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(a.embedding, req.encoding_format)}
        for i, a in enumerate(answers)
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return json_response({"object": "list", "data": data, "model": req.model or "tgi", "usage": usage})
