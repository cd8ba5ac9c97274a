"""``python -m router``: connect to the shards, warm them up, serve the public API."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence

from common.grpc_security import TlsConfig
from common.model_source import ModelNotFound, resolve_model, tokenizer_source
from common.settings import process_env
from common.tracing import Tracing, setup_tracing
from router.blocks import BlockAllocator
from router.config import Limits, RouterConfig, parse_config
from router.generation_defaults import load_defaults
from router.metrics import RouterMetrics
from router.recovery import ShardLink, WarmupPlan
from router.replicas import Replica, ReplicaSet
from router.scheduler import Scheduler
from router.server import RouterServicer, ServedModel, Serving, create_server
from router.shard_client import ShardClient
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
    serving = await connect_and_warm(config, servicer, tracing, tls)
    servicer.start(serving)
    loop_task = asyncio.create_task(serving.replicas.run())
    log.info("router serving on %s (%d model replicas)", config.listen, len(serving.replicas.replicas))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("SIGTERM: draining %d requests in flight (up to %.0fs)", servicer.in_flight, DRAIN_TIMEOUT_S)
    await servicer.drain(DRAIN_TIMEOUT_S)
    await server.stop(grace=5)
    loop_task.cancel()
    for replica in serving.replicas.replicas:
        await replica.scheduler.shards.close()
    tracing.shutdown()


async def connect_and_warm(config: RouterConfig, servicer: RouterServicer, tracing: Tracing, tls: TlsConfig) -> Serving:
    """Loads the tokenizer, connects to every replica's shards once loaded, warms them up."""
    try:
        source = resolve_model(config.model_id)
    except ModelNotFound as exc:
        raise SystemExit(str(exc)) from exc
    servicer.phase = "loading the tokenizer"
    tokenizer = await asyncio.to_thread(lambda: Tokenizer.load(tokenizer_source(source)))
    servicer.phase = "waiting for the shards to load the model"
    log.info("connecting to shards at %s", ", ".join(config.shard_entries))
    interceptors = tracing.grpc_client_interceptors()
    clients = await asyncio.gather(
        *(ShardClient.connect(entry, SHARD_CONNECT_TIMEOUT_S, interceptors, tls) for entry in config.shard_entries)
    )
    infos = [await shards.info() for shards in clients]
    info = infos[0]
    if any((i.model_id, i.vocab_size) != (info.model_id, info.vocab_size) for i in infos):
        raise SystemExit(f"the replicas serve different models: {sorted({i.model_id for i in infos})}")
    limits = Limits.resolve(config, info.max_position_embeddings, info.device)
    plan = WarmupPlan(limits.max_batch_prefill_tokens, limits.max_batch_size, config.max_batch_total_tokens or 0)
    links = [ShardLink(shards, plan) for shards in clients]
    servicer.phase = "warming up the shards"
    warms = await asyncio.gather(*(link.warm_up() for link in links))
    capacity = min(w.max_supported_total_tokens for w in warms)
    limits = _fit_to_cache(config, limits, capacity)
    tracer = tracing.tracer("switchyard.router")
    replicas = []
    for index, (link, warm) in enumerate(zip(links, warms, strict=True)):
        log.info(
            "replica %d warm: %d KV blocks of %d tokens; limits %s", index, warm.num_blocks, warm.block_size, limits
        )
        allocator = BlockAllocator(warm.num_blocks, warm.block_size)
        metrics = RouterMetrics(model_name=source.display_name)
        scheduler = Scheduler(link, allocator, limits, tokenizer, metrics, tracer, config.shard_recovery_timeout)
        replicas.append(Replica(str(index), scheduler))
    validator = Validator(
        tokenizer,
        limits,
        config.max_stop_sequences,
        config.max_top_n_tokens,
        info.vocab_size,
        load_defaults(source),
        choose_format(config.tool_call_format, tokenizer.chat_template_text),
    )
    model = ServedModel(source.display_name, info.dtype, info.device, clients[0].world_size, capacity)
    return Serving(ReplicaSet(replicas, config.placement_load_margin, config.placement_policy), validator, model)


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
