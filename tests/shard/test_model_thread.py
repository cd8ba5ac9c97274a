"""The shard process loads its model and computes every step on one thread.

Why it is tested: libgomp keeps worker threads per thread that opens parallel regions, and
with two such threads (the model loaded on the main thread, stepped on the model thread)
it let idle workers sleep after a few spins, so every parallel region waited on a wake-up:
the shard's decode ran at half speed with nothing else wrong (shard.__main__.serve).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import grpc

from common import sampling_params
from protos import shard_pb2 as pb
from protos import shard_pb2_grpc as pb_grpc
from shard import __main__ as shard_main
from shard.config import parse_config
from shard.numerics.sampling import SamplingParams
from shard.runtime.engine import Engine


def test_the_model_loads_and_steps_on_one_thread(tiny_model_dir, tmp_path, monkeypatch):
    threads: dict[str, set[int]] = {"load": set(), "step": set()}
    load, run = shard_main.load_prepared_model, Engine._run

    def recording_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads["load"].add(threading.get_ident())
        return load(*args, **kwargs)

    def recording_run(self, work):  # type: ignore[no-untyped-def]
        threads["step"].add(threading.get_ident())
        return run(self, work)

    monkeypatch.setattr(shard_main, "load_prepared_model", recording_load)
    monkeypatch.setattr(Engine, "_run", recording_run)
    argv = ["--model-id", str(tiny_model_dir("llama")), "--uds-path", str(tmp_path / "shard"), "--no-prepared-cache"]
    config = parse_config(argv, {})

    async def scenario() -> None:
        server = asyncio.create_task(shard_main.serve(config))
        async with grpc.aio.insecure_channel(config.address) as channel:
            stub = pb_grpc.ShardServiceStub(channel)
            await stub.Health(pb.HealthRequest(), wait_for_ready=True, timeout=120)
            await stub.Warmup(pb.WarmupRequest(max_batch_prefill_tokens=64, max_batch_size=4))
            params = sampling_params.to_pb(SamplingParams(temperature=0.0))
            request = pb.Request(id=1, input_ids=list(range(100, 120)), chunk_len=20, blocks=list(range(8)),
                                 parameters=params)  # fmt: skip
            await stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request])))
            await stub.Decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=1)]))
        # serve() stops on SIGTERM through the handler it installed once serving.
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(server, timeout=30)

    asyncio.run(scenario())
    assert len(threads["load"]) == 1 and threads["step"] == threads["load"]
    assert threads["load"] != {threading.get_ident()}
