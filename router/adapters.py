"""LoRA adapters served beside the base model (LORA_ADAPTERS, and loaded at run time).

The router is the one place that knows which adapters are served: it loads each onto
every shard before the shard's Warmup (so their memory is counted before the KV cache
is sized), again on a shard that restarted, and on a replica that joins. A request
names its adapter (router.proto, GenerateRequest.adapter or .model); the shards apply
it to that request's rows only (shard.proto, Request.adapter). Unloading first stops
admitting requests for the adapter, waits for those it runs, then unloads it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from common.grpc_errors import ServiceError
from router.errors import ValidationError
from router.shard_client import ShardClient

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often an unload looks again for requests still using the adapter.
UNLOAD_POLL_S = 0.05


class UnknownModel(ServiceError):
    """A request names an adapter (or model) that is not served: NOT_FOUND (OpenAI's model_not_found)."""

    code = grpc.StatusCode.NOT_FOUND


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    path: str
    rank: int = 0


def parse_adapters(value: str | None) -> dict[str, str]:
    """LORA_ADAPTERS, as TGI writes it: ``name=path,name2=path2``; a bare path takes the
    folder's name. Raises ValueError on a repeated or empty name."""
    adapters: dict[str, str] = {}
    for item in (value or "").split(","):
        if not (item := item.strip()):
            continue
        name, _, path = item.partition("=") if "=" in item else (Path(item).name, "", item)
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"LORA_ADAPTERS: {item!r} is not name=path or a folder")
        if name in adapters:
            raise ValueError(f"LORA_ADAPTERS: adapter {name} is given twice")
        adapters[name] = path
    return adapters


class AdapterRegistry:
    def __init__(self, configured: dict[str, str] | None = None):
        #: Served adapters, in load order (the order they are loaded onto a new shard).
        self.adapters: dict[str, ServedAdapter] = {n: ServedAdapter(n, p) for n, p in (configured or {}).items()}
        #: Adapters being unloaded: refused to new requests.
        self.unloading: set[str] = set()

    def resolve(self, adapter: str, model: str, base_names: Iterable[str]) -> str:
        """The adapter a request uses ("" for the base model), from its explicit ``adapter`` or the
        ``model`` it names (router.proto, GenerateRequest.model)."""
        if adapter:
            if not self._serves(adapter):
                raise UnknownModel(f"The adapter '{adapter}' is not loaded", "adapter")
            return adapter
        if self._serves(model):
            return model
        if not model or not self.adapters or model in base_names or model == "tgi":
            return ""
        raise UnknownModel(
            f"The model '{model}' does not exist: serve it as a LoRA adapter or name the base model", "model"
        )

    def _serves(self, name: str) -> bool:
        return name in self.adapters and name not in self.unloading

    async def load_onto(self, shards: ShardClient) -> None:
        """Every served adapter onto ``shards`` (before their Warmup, or after a restart)."""
        for served in list(self.adapters.values()):
            answer = await _refused_as_invalid(shards.load_adapter(served.name, served.path))
            self.adapters[served.name] = ServedAdapter(served.name, served.path, answer.rank)

    async def load(self, name: str, path: str, replicas: list[ShardClient]) -> ServedAdapter:
        """Loads ``name`` onto every replica's shards; INVALID_ARGUMENT when it is served already
        (vLLM's rule: unload it first) or does not fit the model (the shards' message)."""
        if not name or not path:
            raise ValidationError("an adapter needs a name and a path", "lora_name" if not name else "lora_path")
        if name in self.adapters:
            raise ValidationError(f"The adapter '{name}' is already loaded: unload it first", "lora_name")
        ranks = [(await _refused_as_invalid(shards.load_adapter(name, path))).rank for shards in replicas]
        served = self.adapters[name] = ServedAdapter(name, path, max(ranks, default=0))
        log.info("LoRA adapter %s loaded from %s (rank %d)", name, path, served.rank)
        return served

    async def unload(
        self, name: str, replicas: list[ShardClient], in_use: Callable[[str], bool], timeout_s: float
    ) -> None:
        """Refuses new requests for ``name``, waits (up to ``timeout_s``) for those running, unloads it."""
        if not self._serves(name):
            raise UnknownModel(f"The adapter '{name}' is not loaded", "lora_name")
        self.unloading.add(name)
        try:
            deadline = asyncio.get_running_loop().time() + timeout_s
            while in_use(name):
                if asyncio.get_running_loop().time() > deadline:
                    raise ServiceError(
                        f"The adapter '{name}' is still in use after {timeout_s:.0f} s; try again later",
                        "lora_name", grpc.StatusCode.FAILED_PRECONDITION,
                    )  # fmt: skip
                await asyncio.sleep(UNLOAD_POLL_S)
            for shards in replicas:
                await shards.unload_adapter(name)
            del self.adapters[name]
            log.info("LoRA adapter %s unloaded", name)
        finally:
            self.unloading.discard(name)


async def _refused_as_invalid(call: Awaitable[T]) -> T:
    """A shard's refusal of an adapter (its message names the adapter and the module) as the
    caller's INVALID_ARGUMENT."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            raise ValidationError(exc.details() or "the adapter was refused", "lora_path") from exc
        raise
