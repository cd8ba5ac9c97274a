"""Cache-aware placement against round robin: 8 replicas of known step cost, shared system prompts.

Starts 8 fake shard processes whose steps cost ``STEP_MS`` plus ``TOKEN_MS`` per
token computed (a model that spends its time on prompt tokens, as a prefill-bound
GPU replica does), and a real router over all of them (``SHARD_ADDRESSES``), once
per placement policy. The workload: requests sharing a handful of long system
prompts, each with its own short question, ``CONCURRENCY`` at a time. Reported
per policy: the share of prompt tokens served from the prefix caches, time to
first token (median, p90) and the router's own CPU time per request.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from benchmarks.router_overhead import _wait_healthy
from protos import router_pb2 as pb
from protos import router_pb2_grpc as pb_grpc

REPLICAS = 8
STEP_MS, TOKEN_MS = 20.0, 0.1
SYSTEM_PROMPTS = 8
REQUESTS, CONCURRENCY, NEW_TOKENS = 256, 32, 8
POLICIES = ("round_robin", "least_loaded", "cache_aware")


def _prompts() -> list[str]:
    systems = [
        f"System {k}: you answer for department {k} of the railway archive. " * 60 for k in range(SYSTEM_PROMPTS)
    ]
    return [f"{systems[i % SYSTEM_PROMPTS]}Question {i}: what is stored in box {i * 7}?" for i in range(REQUESTS)]


async def _one(stub: pb_grpc.RouterStub, prompt: str) -> float:
    params = pb.GenerationParameters(max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=0)
    started, first = time.perf_counter(), None
    async for message in stub.GenerateStream(pb.GenerateRequest(prompt=prompt, parameters=params)):
        if first is None and message.tokens:
            first = time.perf_counter() - started
    assert first is not None, "no token came back"
    return first


async def _workload(address: str) -> tuple[list[float], str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RouterStub(channel)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def limited(prompt: str) -> float:
            async with gate:
                return await _one(stub, prompt)

        ttfts = await asyncio.gather(*(limited(p) for p in _prompts()))
        metrics = (await stub.Metrics(pb.MetricsRequest())).text
    return list(ttfts), metrics


def _summed(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name + "{"))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_policy(policy: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        prefixes = [str(Path(tmp) / f"replica{i}") for i in range(REPLICAS)]
        address = f"unix://{Path(tmp) / 'router.sock'}"
        shard = [sys.executable, "-m", "benchmarks.fake_shard", "--step-ms", str(STEP_MS), "--token-ms", str(TOKEN_MS)]
        procs = [subprocess.Popen([*shard, "--uds-path", p, "--num-blocks", "1024"]) for p in prefixes]
        env = {
            **os.environ,
            "SHARD_ADDRESSES": ",".join(f"unix://{p}-0" for p in prefixes),
            "PLACEMENT_POLICY": policy,
        }
        router_args = ["--listen", address, "--max-total-tokens", "4096", "--max-concurrent-requests", "512"]
        router = subprocess.Popen([sys.executable, "-m", "router", *router_args], env=env, stderr=subprocess.DEVNULL)
        procs.append(router)
        try:
            _wait_healthy(address)
            cpu_before = _cpu_seconds(router.pid)
            started = time.perf_counter()
            ttfts, metrics = asyncio.run(_workload(address))
            wall = time.perf_counter() - started
            cpu = _cpu_seconds(router.pid) - cpu_before
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    hits = _summed(metrics, "switchyard_prefix_cache_hit_tokens_total")
    queried = _summed(metrics, "vllm:prefix_cache_queries_total")
    return {
        "hit_rate": hits / queried if queried else 0.0,
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_p90_ms": statistics.quantiles(ttfts, n=10)[-1] * 1000,
        "router_cpu_ms_per_request": cpu / REQUESTS * 1000,
        "wall_s": wall,
    }


def placement_cost_us() -> float:
    """Median microseconds ReplicaSet.place + bookkeeping takes for one request among 8 warm replicas."""
    from typing import cast

    from router.blocks import BlockAllocator
    from router.config import Limits
    from router.recovery import ShardLink, WarmupPlan
    from router.replicas import Replica, ReplicaSet
    from router.request import Request
    from router.scheduler import Scheduler
    from router.shard_client import ShardClient
    from router.tokenization import Tokenizer
    from support.tiny_models import smollm_tokenizer

    tokenizer = Tokenizer(smollm_tokenizer(), frozenset({2}))
    limits = Limits(4095, 4096, 2048, 128, 1.2, 20)
    link = ShardLink(cast(ShardClient, None), WarmupPlan(2048, 128, 0))
    replicas = ReplicaSet(
        [Replica(str(i), Scheduler(link, BlockAllocator(1024, 16), limits, tokenizer)) for i in range(REPLICAS)]
    )
    prompts = [tokenizer.encode(p, add_special_tokens=True) for p in _prompts()[:64]]
    timings = []
    for i, ids in enumerate(prompts * 4):
        request = Request(id=i, prompt_ids=ids, sampling=None, stream=None)  # type: ignore[arg-type]
        started = time.perf_counter()
        chain = replicas._chain(request)
        replica = replicas.place(request, chain)
        replicas._remember(replica, chain)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1e6


def run() -> dict[str, dict[str, float]]:
    results = {policy: run_policy(policy) for policy in POLICIES}
    results["cache_aware"]["placement_us"] = placement_cost_us()
    return results


def report(results: dict[str, dict[str, float]]) -> str:
    lines = [
        f"placement: {REPLICAS} replicas (step {STEP_MS} ms + {TOKEN_MS} ms/token), {REQUESTS} requests over "
        f"{SYSTEM_PROMPTS} shared system prompts (~1000 tokens), {CONCURRENCY} at a time",
        f"  {'policy':<13} {'prefix hits':>11} {'TTFT p50':>9} {'TTFT p90':>9} {'router CPU/req':>15} {'wall':>6}",
    ]
    for policy, r in results.items():
        lines.append(
            f"  {policy:<13} {r['hit_rate']:>10.0%} {r['ttft_p50_ms']:>7.0f}ms {r['ttft_p90_ms']:>7.0f}ms "
            f"{r['router_cpu_ms_per_request']:>13.2f}ms {r['wall_s']:>5.1f}s"
        )
    lines.append(
        f"  cache-aware placement itself: {results['cache_aware']['placement_us']:.0f} us per request (median)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(run()))
