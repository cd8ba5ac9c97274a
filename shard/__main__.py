"""``python -m shard``: load the model and serve the shard API."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import logging
import os
import signal
import sys
from collections.abc import Sequence

import torch

from common.grpc_security import TlsConfig
from common.model_source import ModelNotFound, ModelSource, resolve_model
from common.settings import process_env
from common.tracing import setup_tracing
from shard.config import ShardConfig, parse_config
from shard.loading.model_loader import choose_dtype
from shard.loading.prepared_model import load_prepared_model
from shard.numerics.invariant_linear import quantize_activations
from shard.runtime.engine import Engine
from shard.runtime.grammar import GrammarCompiler
from shard.runtime.server import ShardServicer, create_server

log = logging.getLogger("shard")


def pick_device(config: ShardConfig) -> torch.device:
    if config.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", config.rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", config.rank)
    return device


def join_process_group(config: ShardConfig, device: torch.device) -> None:
    """Joins the ranks of this model replica: NCCL between GPUs, gloo on CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    log.info("rank %d/%d joining %s process group at %s:%d", config.rank, config.world_size, backend,
             config.master_addr, config.master_port)  # fmt: skip
    torch.distributed.init_process_group(
        backend,
        init_method=f"tcp://{config.master_addr}:{config.master_port}",
        rank=config.rank,
        world_size=config.world_size,
        # A rank that dies mid-collective must not hang the others for the default 30 minutes.
        timeout=datetime.timedelta(seconds=120),
    )


def prepare_engine(config: ShardConfig, source: ModelSource, device: torch.device) -> tuple[Engine, str]:
    """The engine and the model's architecture name; runs on the model thread (see ``serve``)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    dtype = choose_dtype(config.dtype, device)
    if config.world_size > 1:
        join_process_group(config, device)
    model = load_prepared_model(source, dtype, device, config.world_size, config.quantize, config.prepared_cache)
    # Switched after the prepared model is mapped: one cached preparation serves either setting.
    if config.quantized_activations and not quantize_activations(model):
        log.warning("QUANTIZED_ACTIVATIONS is set, but no layer is stored as 4-, 5- or 6-bit values")
    engine = Engine(
        model,
        device,
        config.block_size,
        config.kv_cache_fraction,
        config.world_size,
        config.attention_backend,
        config.kv_prefault,
        config.kv_prefault_ready_s,
    )
    if config.draft_model_id:
        add_draft_model(engine, config, dtype, device)
    engine.grammar_compiler = GrammarCompiler(source, engine.vocab_size)
    return engine, (model.config.architectures or [type(model).__name__])[0]


def add_draft_model(engine: Engine, config: ShardConfig, dtype: torch.dtype, device: torch.device) -> None:
    """DRAFT_MODEL_ID, loaded as the model is (its quantized blocks kept), serving Guesses.draft."""
    try:
        source = resolve_model(config.draft_model_id)
    except ModelNotFound as exc:
        raise SystemExit(f"DRAFT_MODEL_ID: {exc}") from exc
    draft = load_prepared_model(source, dtype, device, 1, "auto", config.prepared_cache)
    try:
        engine.add_drafter(draft, config.attention_backend)
    except ValueError as exc:
        raise SystemExit(f"DRAFT_MODEL_ID={config.draft_model_id}: {exc}") from exc
    log.info("draft model %s: guesses on request (SPECULATIVE_METHOD=draft)", source.display_name)


async def serve(config: ShardConfig) -> None:
    try:
        source = resolve_model(config.model_id)
    except ModelNotFound as exc:
        raise SystemExit(str(exc)) from exc
    device = pick_device(config)
    # Every torch and kernel call of this process runs on this one thread, loading included.
    # OpenMP (libgomp) keeps a team of threads per thread that starts parallel regions; once
    # two threads have teams, it counts more threads than cores and makes idle workers sleep
    # after ~100 spins, so every parallel region waits for a futex wake-up: a decode step took
    # twice as long (docs/performance.md, "One model thread").
    model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
    loop = asyncio.get_running_loop()
    engine, architecture = await loop.run_in_executor(model_thread, prepare_engine, config, source, device)
    tracing = setup_tracing(config.otlp_service_name, config.otlp_endpoint)
    servicer = ShardServicer(engine, config, source.display_name, architecture, tracing, model_thread)
    if not config.listen:
        # A stale socket from a crashed run would make the bind fail.
        path = config.address.removeprefix("unix://")
        if os.path.exists(path):
            os.unlink(path)
    server = create_server(servicer, config.address, tracing, TlsConfig.from_env(process_env()))
    await server.start()
    log.info(
        "shard %d/%d serving %s on %s",
        config.rank,
        config.world_size,
        source.display_name,
        config.address,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=5)
    tracing.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s shard %(levelname)s %(message)s", stream=sys.stderr)
    config = parse_config(argv, process_env())
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
