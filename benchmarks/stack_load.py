"""Many concurrent OpenAI streams through the whole stack (facade -> router -> shard), default model.

Reports failures, throughput and TTFT, and the KV blocks still in use once every
stream has finished (must be zero).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port


async def _one(client: openai.AsyncOpenAI, i: int, max_tokens: int, forced: bool) -> tuple[float, int]:
    started = time.perf_counter()
    ttft, tokens = 0.0, 0
    stream = await client.chat.completions.create(
        model="tgi",
        messages=[{"role": "user", "content": f"Tell me fact number {i} about trains."}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        # Forced: exactly max_tokens each (min_tokens holds back the end of sequence), as the
        # reference figures of issue 7 were measured.
        extra_body={"min_tokens": max_tokens} if forced else None,
    )
    async for chunk in stream:
        if not ttft and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - started
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return ttft, tokens


async def _load(url: str, streams: int, max_tokens: int, forced: bool) -> dict[str, float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1/", api_key="-", max_retries=0, timeout=600)
    started = time.perf_counter()
    runs = (_one(client, i, max_tokens, forced) for i in range(streams))
    results = await asyncio.gather(*runs, return_exceptions=True)
    elapsed = time.perf_counter() - started
    ok = [r for r in results if not isinstance(r, BaseException)]
    return {
        "streams": streams,
        "failures": len(results) - len(ok),
        "tokens_per_s": sum(t for _, t in ok) / elapsed,
        "ttft_p50_s": statistics.median(t for t, _ in ok) if ok else float("nan"),
    }


def _blocks_used(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        for family in text_string_to_metric_families(r.read().decode()):
            for sample in family.samples:
                if sample.name == "switchyard_kv_blocks_used":
                    return sample.value
    raise RuntimeError("switchyard_kv_blocks_used missing")


#: (streams, max_tokens, forced length) per load: the shapes of issue 7's comparison with
#: vLLM's CPU build and llama.cpp (1, 16 and 64 streams of exactly 128 tokens), then many
#: short streams of natural length.
LOADS = ((1, 128, True), (16, 128, True), (64, 128, True), (256, 32, False))


def run(loads: tuple[tuple[int, int, bool], ...] = LOADS) -> list[dict[str, float]]:
    """One stack (the launcher, defaults as served), each load in turn against it."""
    port = free_port()
    most = max(streams for streams, _, _ in loads)
    env = {**os.environ, "MAX_CONCURRENT_REQUESTS": str(most), "MAX_BATCH_SIZE": "128"}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "--port", str(port), "--hostname", "127.0.0.1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 900  # loading, then compiling the decode step
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("the stack did not start") from None
                    time.sleep(0.5)
            results = []
            asyncio.run(_load(url, 2, 8, True))  # first requests after start-up: not measured
            for streams, max_tokens, forced in loads:
                result = asyncio.run(_load(url, streams, max_tokens, forced))
                result["max_tokens"] = max_tokens
                result["forced"] = forced
                result["kv_blocks_used_after"] = _blocks_used(url)
                results.append(result)
            return results
        finally:
            proc.terminate()
            proc.wait(30)


def report(results: list[dict[str, float]]) -> str:
    return "\n".join(
        f"stack load: {r['streams']:.0f} concurrent streams x {r['max_tokens']:.0f} tokens "
        f"({'exactly' if r['forced'] else 'at most'}), {r['failures']:.0f} "
        f"failures, {r['tokens_per_s']:.0f} tokens/s, TTFT p50 {r['ttft_p50_s']:.2f}s, "
        f"KV blocks in use afterwards: {r['kv_blocks_used_after']:.0f}"
        for r in results
    )


if __name__ == "__main__":
    print(report(run()))
