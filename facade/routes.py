"""The route table, and the small service routes (models, health, metrics)."""

from __future__ import annotations

import grpc
from aiohttp import web

from common.grpc_errors import written_for_users
from facade import embeddings, lora, openai_chat, openai_completions, openai_responses, openapi, pages, tgi, tokenize
from facade.choices import router_info
from facade.errors import ApiError, from_grpc
from facade.json_body import json_response
from facade.state import METRICS, ROUTER, STARTED_AT
from protos import router_pb2 as pb


def _card(info: pb.InfoResponse, created: int) -> dict:
    return {
        "id": info.model_id,
        "object": "model",
        "created": created,
        "owned_by": "switchyard",
        "root": info.model_id,
        "parent": None,
        "max_model_len": info.max_total_tokens,
    }


async def models(request: web.Request) -> web.Response:
    """The served model, then each LoRA adapter with the model as its ``parent`` (vLLM's listing)."""
    card = _card(await router_info(request.app[ROUTER]), request.app[STARTED_AT])
    adapters = [lora.adapter_card(a, card) for a in await lora.served_adapters(request)]
    return json_response({"object": "list", "data": [card, *adapters]})


async def model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: the served model under its own name or "tgi" (TGI's convention),
    or a LoRA adapter."""
    info = await router_info(request.app[ROUTER])
    name = request.match_info["model"]
    card = _card(info, request.app[STARTED_AT])
    if name in (info.model_id, "tgi"):
        return json_response(card | {"id": name})
    for adapter in await lora.served_adapters(request):
        if adapter.name == name:
            return json_response(lora.adapter_card(adapter, card))
    raise ApiError(404, f"The model '{name}' does not exist", "invalid_request_error", "model", "model_not_found")


async def health(request: web.Request) -> web.Response:
    try:
        await request.app[ROUTER].Health(pb.HealthRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        # A probe runs every few seconds: one line, never a traceback.
        why = exc.details() if written_for_users(exc) else "the router is not reachable (starting or restarting)"
        raise ApiError(503, f"not ready: {why}", "service_unavailable", None, "unavailable") from exc
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """The facade's metrics followed by the router's (queue, batch, KV blocks, latencies)."""
    try:
        router_text = (await request.app[ROUTER].Metrics(pb.MetricsRequest(), timeout=10)).text.encode()
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc) from exc
    facade_metrics = request.app[METRICS]
    body = facade_metrics.exposition() + facade_metrics.with_refusals(router_text)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


ROUTES = [
    web.post("/v1/chat/completions", openai_chat.chat_completions),
    web.post("/v1/completions", openai_completions.completions),
    web.post("/v1/responses", openai_responses.create),
    web.post("/v1/embeddings", embeddings.embeddings),
    web.get("/v1/responses/{response_id}", openai_responses.retrieve),
    web.delete("/v1/responses/{response_id}", openai_responses.delete),
    web.get("/v1/models", models),
    web.post("/v1/load_lora_adapter", lora.load),
    web.post("/v1/unload_lora_adapter", lora.unload),
    web.get("/v1/models/{model:.+}", model),
    web.post("/tokenize", tokenize.tokenize),
    web.post("/detokenize", tokenize.detokenize),
    web.post("/generate", tgi.generate),
    web.post("/generate_stream", tgi.generate_stream),
    web.post("/", tgi.compat),
    web.get("/info", tgi.info),
    web.get("/health", health),
    web.get("/metrics", metrics),
    web.get("/openapi.json", openapi.openapi_json),
    *pages.ROUTES,
]
