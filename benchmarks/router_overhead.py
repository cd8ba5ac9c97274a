"""The router's own cost: many concurrent streams against a shard that returns instantly.

Starts a fake shard and a real router as separate processes, then opens N
concurrent GenerateStream calls on the router's public gRPC API and counts
generated tokens per second of wall time. Scheduling must never be what the
model waits for: the target is at least 20,000 tokens/s across 128 streams.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from protos import router_pb2 as pb
from protos import router_pb2_grpc as pb_grpc


async def _stream(stub: pb_grpc.RouterStub, i: int, tokens: int) -> int:
    params = pb.GenerationParameters(max_new_tokens=tokens, ignore_eos=True, seed=i)
    count = 0
    async for message in stub.GenerateStream(pb.GenerateRequest(prompt=f"stream {i} says", parameters=params)):
        count += len(message.tokens)
    return count


async def _round(address: str, streams: int, tokens: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RouterStub(channel)
        await _stream(stub, 0, 2)  # warm
        started = time.perf_counter()
        counts = await asyncio.gather(*(_stream(stub, i, tokens) for i in range(streams)))
        elapsed = time.perf_counter() - started
    assert sum(counts) == streams * tokens, "a stream lost tokens"
    return sum(counts) / elapsed


def _wait_healthy(address: str, timeout_s: float = 120) -> None:
    async def probe() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            await pb_grpc.RouterStub(channel).Health(pb.HealthRequest(), timeout=2)

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            asyncio.run(probe())
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def run(streams: int = 128, tokens: int = 256, rounds: int = 3) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        shard_prefix = str(Path(tmp) / "shard")
        address = f"unix://{Path(tmp) / 'router.sock'}"
        procs = [
            subprocess.Popen([sys.executable, "-m", "benchmarks.fake_shard", "--uds-path", shard_prefix]),
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "router",
                    "--listen",
                    address,
                    "--shard-uds-path",
                    shard_prefix,
                    "--max-batch-size",
                    str(streams),
                    "--max-concurrent-requests",
                    str(streams * 2),
                    "--max-total-tokens",
                    "4096",
                ],
                stderr=subprocess.DEVNULL,
            ),
        ]
        try:
            _wait_healthy(address)
            rates = [asyncio.run(_round(address, streams, tokens)) for _ in range(rounds)]
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    return {"streams": streams, "tokens_per_stream": tokens, "median_tokens_per_s": statistics.median(rates)}


if __name__ == "__main__":
    result = run()
    print(
        f"router overhead: {result['median_tokens_per_s']:.0f} generated tokens/s "
        f"across {result['streams']} streams (median of 3; target >= 20000)"
    )
