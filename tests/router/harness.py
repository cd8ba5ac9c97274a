"""A real router (scheduler, validator, gRPC shard client) over a FakeEngine shard server."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from common.tracing import Tracing
from protos import router_pb2 as pb
from router.blocks import BlockAllocator
from router.config import Limits
from router.recovery import ShardLink, WarmupPlan
from router.request import Request
from router.scheduler import Scheduler
from router.shard_client import ShardClient
from router.tokenization import Tokenizer
from router.validation import Validator
from shard.config import ShardConfig
from shard.runtime.server import ShardServicer, create_server
from support.fake_engine import FakeEngine, next_token


@dataclass
class Harness:
    scheduler: Scheduler
    validator: Validator
    engine: FakeEngine
    ids: itertools.count
    shard: ShardProcess

    async def restart_shard(self, down_s: float = 0.0) -> None:
        """The shard dies (its calls in flight fail, its KV is gone) and a new one starts at the same address."""
        await self.shard.stop()
        await asyncio.sleep(down_s)
        self.engine = FakeEngine(self.engine.num_blocks, self.engine.block_size, verify=self.engine.verify)
        await self.shard.start(self.engine)

    def request(self, prompt: str, max_new_tokens: int = 8, seed: int = 0) -> Request:
        # Greedy: tests compare with transformers' greedy generate.
        params = pb.GenerationParameters(max_new_tokens=max_new_tokens, seed=seed, ignore_eos=True, temperature=0)
        return self.validator.request(next(self.ids), pb.GenerateRequest(prompt=prompt, parameters=params))

    def check(self) -> None:
        """Invariants that hold between any two steps."""
        s = self.scheduler
        s.allocator.check({r.id: r.blocks for r in s.active})
        waiting, active = {r.id for r in s.waiting}, {r.id for r in s.active}
        assert not waiting & active, "a request is both queued and running"
        assert all(not r.blocks for r in s.waiting), "a queued request holds blocks"
        assert len(s.active) <= s.limits.max_batch_size
        for kind, tokens, _ in self.engine.steps:
            if kind == "prefill":
                assert tokens <= s.limits.max_batch_prefill_tokens


def expected_tokens(r: Request) -> list[int]:
    """What an uninterrupted run gives: the fake's tokens depend only on the sequence and seed."""
    tokens = list(r.prompt_ids)
    for _ in range(r.max_new_tokens):
        tokens.append(next_token(tokens, r.sampling.seed))
    return tokens[len(r.prompt_ids) :]


@dataclass
class ShardProcess:
    """A shard server in this process, standing in for one shard process."""

    config: ShardConfig
    tracing: Tracing
    server: grpc.aio.Server | None = None

    async def start(self, engine: Any) -> None:
        servicer = ShardServicer(engine, self.config, "fake", "FakeForCausalLM", self.tracing)
        self.server = create_server(servicer, self.config.address, self.tracing)
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None


@asynccontextmanager
async def fake_router(
    tokenizer: Tokenizer,
    sockets: Path,
    num_blocks: int = 64,
    block_size: int = 4,
    max_batch_prefill_tokens: int = 64,
    max_batch_size: int = 8,
    max_total_tokens: int = 200,
    verify: bool = True,
    waiting_served_ratio: float = 0.0,
    max_waiting_tokens: int = 0,
    engine: Any = None,
    tracing: Tracing | None = None,
) -> AsyncIterator[Harness]:
    """The router over a shard server running ``engine`` (a FakeEngine unless given)."""
    engine = engine or FakeEngine(num_blocks, block_size, verify=verify)
    config = ShardConfig(None, None, "cpu", 0, 1, str(sockets / "shard"), None, block_size, 0.1)
    tracing = tracing or Tracing()
    shard = ShardProcess(config, tracing)
    await shard.start(engine)
    shards = await ShardClient.connect(config.address, timeout=10, interceptors=tracing.grpc_client_interceptors())
    try:
        limits = Limits(
            max_total_tokens - 1,
            max_total_tokens,
            max_batch_prefill_tokens,
            max_batch_size,
            waiting_served_ratio,
            max_waiting_tokens,
        )
        link = ShardLink(shards, WarmupPlan(max_batch_prefill_tokens, max_batch_size, 0))
        await link.warm_up()
        allocator = BlockAllocator(num_blocks, block_size)
        scheduler = Scheduler(link, allocator, limits, tokenizer, tracer=tracing.tracer("switchyard.router"))
        validator = Validator(tokenizer, limits, max_stop_sequences=4)
        yield Harness(scheduler, validator, engine, itertools.count(1), shard)
    finally:
        await shards.close()
        await shard.stop()
