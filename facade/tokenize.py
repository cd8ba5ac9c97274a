"""``POST /tokenize`` and ``POST /detokenize``, in the shapes vLLM serves (``vllm bench serve`` uses them)."""

from __future__ import annotations

from typing import Any

import grpc
from aiohttp import web

from facade.choices import router_info
from facade.errors import from_grpc, invalid, use_tgi_errors
from facade.json_body import json_response, read_json
from facade.openai_chat import parse_chat
from facade.params import token_ids
from facade.request_models import UINT32_MAX, DetokenizeRequest, TokenizeRequest, validate_body
from facade.state import ROUTER
from protos import router_pb2 as pb


def parse_tokenize(body: Any) -> pb.TokenizeRequest:
    req = validate_body(TokenizeRequest, body)
    if req.messages is not None:
        chat_body = {"messages": body["messages"], "model": req.model or "tgi"}
        if req.chat_template_kwargs is not None:
            chat_body["chat_template_kwargs"] = req.chat_template_kwargs
        chat = parse_chat(chat_body)
        return pb.TokenizeRequest(chat=chat.requests[0].chat)
    if req.prompt is None:
        raise invalid("'prompt' (a string) or 'messages' is required", "prompt")
    return pb.TokenizeRequest(prompt=req.prompt)


def parse_detokenize(body: Any) -> pb.DetokenizeRequest:
    req = validate_body(DetokenizeRequest, body)
    if not token_ids(req.tokens):
        raise invalid(f"'tokens' must be an array of token ids (integers in 0..{UINT32_MAX})", "tokens")
    return pb.DetokenizeRequest(ids=req.tokens)


async def tokenize(request: web.Request) -> web.Response:
    body = await read_json(request)
    if "inputs" in body:
        return await _tgi_tokenize(request, body)
    message = parse_tokenize(body)
    try:
        router = request.app[ROUTER]
        answer = await router.Tokenize(message)
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc) from exc
    info = await router_info(router)
    return json_response({"count": len(answer.ids), "max_model_len": info.max_total_tokens, "tokens": list(answer.ids)})


async def detokenize(request: web.Request) -> web.Response:
    message = parse_detokenize(await read_json(request))
    try:
        answer = await request.app[ROUTER].Detokenize(message)
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc) from exc
    return json_response({"prompt": answer.text})


async def _tgi_tokenize(request: web.Request, body: dict) -> web.Response:
    """TGI's shape: ``{"inputs": text}`` -> ``[{"id", "text", "start", "stop"}, ...]`` (character offsets)."""
    use_tgi_errors(request)
    inputs = validate_body(TokenizeRequest, body).inputs
    if not inputs:
        raise invalid("'inputs' must be a non-empty string", "inputs")
    try:
        answer = await request.app[ROUTER].Tokenize(pb.TokenizeRequest(prompt=inputs))
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc) from exc
    spans = [(o.start, o.stop) for o in answer.offsets] or [(0, 0)] * len(answer.ids)
    return json_response(
        [{"id": i, "text": inputs[a:b], "start": a, "stop": b} for i, (a, b) in zip(answer.ids, spans, strict=True)]
    )
