"""Which shard processes the router warmed, and bringing back ones that restarted.

A shard that dies loses every sequence's KV; the launcher (or compose) starts a
new process at the same address. The router tells the two apart by the
``instance_id`` each shard process reports in Health, re-runs Warmup on the new
one, and the scheduler recomputes what the lost KV held (prompt plus the tokens
already generated, as after a preemption), so the streams continue unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from protos import shard_pb2 as pb
from router.adapters import AdapterRegistry
from router.shard_client import ShardClient

log = logging.getLogger(__name__)

#: Health probes answer from the shard's event loop, even during a long step.
HEALTH_TIMEOUT_S = 2.0
#: How often a lost shard is probed while it restarts.
RETRY_INTERVAL_S = 0.2
#: How often the scheduler looks at its queue while the shards are being restored.
QUEUE_CHECK_INTERVAL_S = 0.5


@dataclass(frozen=True)
class WarmupPlan:
    """The Warmup arguments, kept so a restarted shard is warmed exactly like the first one."""

    prefill_tokens: int
    batch_size: int
    total_tokens: int


class ShardLink:
    def __init__(self, shards: ShardClient, plan: WarmupPlan, adapters: AdapterRegistry | None = None):
        self.shards = shards
        self.plan = plan
        #: The LoRA adapters every warm-up loads first (router.adapters).
        self.adapters = adapters
        #: Instance id of every rank as of the last Warmup.
        self.instances: list[str] = []

    async def warm_up(self) -> pb.WarmupResponse:
        """Loads the served adapters, warms every rank and remembers which processes hold the cache."""
        if self.adapters is not None:
            await self.adapters.load_onto(self.shards)
        answer = await self.shards.warmup(self.plan.prefill_tokens, self.plan.batch_size, self.plan.total_tokens)
        # A rank that restarted between the two calls reports warm=False at the next check.
        self.instances = [h.instance_id for h in await self.shards.health(HEALTH_TIMEOUT_S)]
        return answer

    async def problem(self) -> str | None:
        """Why the warmed shards can no longer serve (unreachable, restarted, cold), or None."""
        try:
            answers = await self.shards.health(HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.debug("shard health: %s", exc)
            return "a model shard is unavailable"
        if [a.instance_id for a in answers] != self.instances:
            return "a model shard restarted"
        if not all(a.warm for a in answers):
            return "a model shard is not warmed up"
        return None

    async def restore(self) -> pb.WarmupResponse:
        """Waits until every rank answers again, then warms them up; retried until it succeeds."""
        while True:
            try:
                await self.shards.health(HEALTH_TIMEOUT_S)
                return await self.warm_up()
            except grpc.aio.AioRpcError as exc:
                log.debug("shards not back yet: %s", exc.code().name)
            await asyncio.sleep(RETRY_INTERVAL_S)

    async def restore_watching(self, check_queue: Callable[[], None]) -> pb.WarmupResponse:
        """``restore``, calling ``check_queue`` every QUEUE_CHECK_INTERVAL_S meanwhile (the
        scheduler ends the requests that waited longer than the recovery timeout)."""
        restore = asyncio.create_task(self.restore())
        while not restore.done():
            check_queue()
            await asyncio.wait([restore], timeout=QUEUE_CHECK_INTERVAL_S)
        return restore.result()
