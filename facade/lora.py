"""LoRA adapters over HTTP, as vLLM serves them: ``/v1/models`` lists each adapter with its
base as ``parent``; ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` load and
unload them at run time (behind API_KEY like every route). The router does the work
(router.adapters)."""

from __future__ import annotations

import grpc
from aiohttp import web

from facade.errors import from_grpc
from facade.json_body import read_json
from facade.request_models import LoadLoraAdapterRequest, UnloadLoraAdapterRequest, validate_body
from facade.state import ROUTER
from protos import router_pb2 as pb


async def served_adapters(request: web.Request) -> list[pb.Adapter]:
    try:
        return list((await request.app[ROUTER].ListAdapters(pb.ListAdaptersRequest(), timeout=10)).adapters)
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc) from exc


def adapter_card(adapter: pb.Adapter, base: dict) -> dict:
    return base | {"id": adapter.name, "root": adapter.path, "parent": base["id"]}


async def load(request: web.Request) -> web.Response:
    body = validate_body(LoadLoraAdapterRequest, await read_json(request))
    message = pb.LoadAdapterRequest(name=body.lora_name, path=body.lora_path)
    try:
        await request.app[ROUTER].LoadAdapter(message, timeout=600)
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc) from exc
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload(request: web.Request) -> web.Response:
    body = validate_body(UnloadLoraAdapterRequest, await read_json(request))
    try:
        # An adapter in use is unloaded once its running requests are done (up to 10 minutes).
        await request.app[ROUTER].UnloadAdapter(pb.UnloadAdapterRequest(name=body.lora_name), timeout=660)
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc) from exc
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
