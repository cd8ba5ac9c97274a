"""``python -m router``: connect to the shards, warm them up, serve the public API."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from common.grpc_errors import ServiceError
from common.grpc_security import TlsConfig
from common.model_source import ModelNotFound, resolve_model, tokenizer_source
from common.settings import process_env
from common.tracing import Tracing, setup_tracing
from protos import shard_pb2 as pb
from router.adapters import AdapterRegistry, parse_adapters
from router.blocks import BlockAllocator
from router.config import Limits, RouterConfig, parse_config
from router.discovery import CONNECT_ATTEMPT_S, Discovery, resolve
from router.embeddings import load_embedding_config
from router.generation_defaults import load_defaults
from router.metrics import RouterMetrics
from router.reasoning import reasoning_format
from router.recovery import ShardLink, WarmupPlan
from router.replicas import Replica, ReplicaSet
from router.scheduler import Scheduler
from router.server import RouterServicer, ServedModel, Serving, create_server
from router.shard_client import ShardClient
from router.speculation import SpeculationPolicy
from router.tokenization import Tokenizer
from router.tools import choose_format
from router.validation import Validator

log = logging.getLogger("router")

SHARD_CONNECT_TIMEOUT_S = 600.0
#: How long SIGTERM waits for in-flight requests before stopping anyway.
DRAIN_TIMEOUT_S = 60.0


async def serve(config: RouterConfig) -> None:
    tracing = setup_tracing(config.otlp_service_name, config.otlp_endpoint)
    tls = TlsConfig.from_env(process_env())
    tracer = tracing.tracer("switchyard.router")
    # Listening from the start: until the shards are warm, Health says which phase we are in.
    servicer = RouterServicer(config.max_concurrent_requests, tracer)
    server = create_server(servicer, config.listen, tracing, tls, config.api_key)
    await server.start()
    serving, discovery = await connect_and_warm(config, servicer, tracing, tls)
    servicer.start(serving)
    tasks = [asyncio.create_task(serving.replicas.run()), asyncio.create_task(discovery.run())]
    log.info("router serving on %s (%d model replicas)", config.listen, len(serving.replicas.replicas))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("SIGTERM: draining %d requests in flight (up to %.0fs)", servicer.in_flight, DRAIN_TIMEOUT_S)
    await servicer.drain(DRAIN_TIMEOUT_S)
    await server.stop(grace=5)
    for task in tasks:
        task.cancel()
    for replica in serving.replicas.replicas:
        await replica.scheduler.shards.close()
    tracing.shutdown()


@dataclass
class ReplicaMaker:
    """Makes a Replica of a warm shard group: the same way at start and for one that joins later."""

    config: RouterConfig
    tokenizer: Tokenizer
    model_name: str
    vocab_size: int
    limits: Limits
    plan: WarmupPlan
    tracer: trace.Tracer
    connect: Callable[[str, float], Coroutine[Any, Any, ShardClient]]
    adapters: AdapterRegistry

    def make(self, name: str, link: ShardLink, warm: pb.WarmupResponse) -> Replica:
        log.info("replica %s warm: %d KV blocks of %d tokens", name, warm.num_blocks, warm.block_size)
        allocator = BlockAllocator(warm.num_blocks, warm.block_size)
        metrics = RouterMetrics(model_name=self.model_name)
        scheduler = Scheduler(
            link,
            allocator,
            self.limits,
            self.tokenizer,
            metrics,
            self.tracer,
            self.config.shard_recovery_timeout,
            pipeline=self.config.pipeline_steps,
            speculation=speculation_policy(self.config),
        )
        return Replica(name, scheduler)

    async def join(self, replicas: ReplicaSet, address: str) -> None:
        """Connects, checks and warms the replica at ``address`` and adds it (raises if it cannot)."""
        shards = await self.connect(address, CONNECT_ATTEMPT_S)
        try:
            info = await shards.info()
            if info.vocab_size != self.vocab_size:
                raise RuntimeError(f"it serves a different model ({info.model_id})")
            if missing := missing_draft(self.config, info):
                raise RuntimeError(missing)
            link = ShardLink(shards, self.plan, self.adapters)
            warm = await link.warm_up()
            if warm.max_supported_total_tokens < self.limits.max_total_tokens:
                raise RuntimeError(f"its KV cache holds {warm.max_supported_total_tokens} tokens, below the limits")
        except BaseException:
            await shards.close()
            raise
        replicas.add(self.make(str(len(replicas.replicas)), link, warm))


def speculation_policy(config: RouterConfig) -> SpeculationPolicy | None:
    """SPECULATE's policy (SPECULATIVE_METHOD's guesses), or None when off."""
    if config.speculate <= 0:
        return None
    return SpeculationPolicy(config.speculate, config.speculation_step_rows, config.speculative_method)


def missing_draft(config: RouterConfig, info: pb.InfoResponse) -> str | None:
    """Why shards described by ``info`` cannot serve SPECULATIVE_METHOD=draft, if they cannot."""
    if config.speculate > 0 and config.speculative_method == "draft" and not info.draft_model_id:
        return f"SPECULATIVE_METHOD=draft, but the shards of {info.model_id} have no draft model: set DRAFT_MODEL_ID"
    return None


async def connect_and_warm(
    config: RouterConfig, servicer: RouterServicer, tracing: Tracing, tls: TlsConfig
) -> tuple[Serving, Discovery]:
    """Loads the tokenizer, connects to the replicas' shards once loaded, warms them up; the
    Discovery it returns adds the replicas that come up later."""
    try:
        source = resolve_model(config.model_id)
    except ModelNotFound as exc:
        raise SystemExit(str(exc)) from exc
    servicer.phase = "loading the tokenizer"
    tokenizer = await asyncio.to_thread(lambda: Tokenizer.load(tokenizer_source(source)))
    servicer.phase = "waiting for the shards to load the model"
    interceptors = tracing.grpc_client_interceptors()

    def connect(address: str, timeout: float) -> Coroutine[Any, Any, ShardClient]:
        return ShardClient.connect(address, timeout, interceptors, tls)

    clients = await _first_replicas(config.shard_entries, connect, config.replica_start_wait)
    info = await next(iter(clients.values())).info()
    if missing := missing_draft(config, info):
        raise SystemExit(missing)
    limits = Limits.resolve(config, info.max_position_embeddings, info.device)
    plan = WarmupPlan(limits.max_batch_prefill_tokens, limits.max_batch_size, config.max_batch_total_tokens or 0)
    try:
        adapters = AdapterRegistry(parse_adapters(config.lora_adapters))
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    links = [ShardLink(shards, plan, adapters) for shards in clients.values()]
    servicer.phase = "loading the LoRA adapters and warming up the shards"
    try:
        warms = await asyncio.gather(*(link.warm_up() for link in links))
    except ServiceError as exc:  # an adapter that does not fit: its message names it and the module
        raise SystemExit(f"LORA_ADAPTERS: {exc}") from exc
    capacity = min(w.max_supported_total_tokens for w in warms)
    limits = _fit_to_cache(config, limits, capacity)
    log.info("limits %s", limits)
    tracer = tracing.tracer("switchyard.router")
    maker = ReplicaMaker(
        config, tokenizer, source.display_name, info.vocab_size, limits, plan, tracer, connect, adapters
    )
    replicas = [maker.make(str(i), link, warm) for i, (link, warm) in enumerate(zip(links, warms, strict=True))]
    replica_set = ReplicaSet(
        replicas, config.placement_load_margin, config.placement_policy, config.max_concurrent_requests
    )
    validator = Validator(
        tokenizer,
        limits,
        config.max_stop_sequences,
        config.max_top_n_tokens,
        info.vocab_size,
        load_defaults(source),
        choose_format(config.tool_call_format, tokenizer.chat_template_text),
        reasoning_format(config.reasoning_parser, tokenizer.chat_template_text),
        await asyncio.to_thread(load_embedding_config, source, config.pooling),
        adapters,
        (source.display_name, info.model_id),
    )
    model = ServedModel(source.display_name, info.dtype, info.device, links[0].shards.world_size, capacity)
    discovery = Discovery(config.shard_entries, lambda a: maker.join(replica_set, a), set(clients))
    return Serving(replica_set, validator, model), discovery


async def _first_replicas(
    entries: list[str], connect: Callable[[str, float], Coroutine[Any, Any, ShardClient]], straggler_wait_s: float
) -> dict[str, ShardClient]:
    """The replicas up at start, by address in the configured order: every one that is up within
    ``straggler_wait_s`` of the first (REPLICA_START_WAIT; the others join later, through Discovery)."""
    deadline = asyncio.get_running_loop().time() + SHARD_CONNECT_TIMEOUT_S
    while not (addresses := await resolve(entries)):
        if asyncio.get_running_loop().time() > deadline:
            raise SystemExit(f"no replica address found in {entries}")
        await asyncio.sleep(1.0)
    log.info("connecting to shards at %s", ", ".join(addresses))
    tasks: dict[asyncio.Task[ShardClient], str] = {
        asyncio.create_task(connect(a, SHARD_CONNECT_TIMEOUT_S)): a for a in addresses
    }
    clients: dict[str, ShardClient] = {}
    pending = set(tasks)
    while pending and not clients:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        clients |= {tasks[t]: t.result() for t in done if t.exception() is None}
    if pending:
        done, pending = await asyncio.wait(pending, timeout=straggler_wait_s)
        clients |= {tasks[t]: t.result() for t in done if t.exception() is None}
        for task in pending:
            task.cancel()
    if not clients:
        raise SystemExit(f"no replica could be reached at {', '.join(addresses)}")
    return {a: clients[a] for a in addresses if a in clients}


def _fit_to_cache(config: RouterConfig, limits: Limits, capacity: int) -> Limits:
    """One request must always fit the KV cache alone, or preemption could not make progress."""
    if limits.max_total_tokens <= capacity:
        return limits
    log.warning("max_total_tokens lowered to the %d KV tokens the shards could allocate", capacity)
    return dataclasses.replace(
        limits, max_input_tokens=min(limits.max_input_tokens, capacity - 1), max_total_tokens=capacity
    )


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s", stream=sys.stderr)
    asyncio.run(serve(parse_config(argv, process_env())))


if __name__ == "__main__":
    main()
