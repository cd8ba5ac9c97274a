"""Two model replicas behind one router (``NUM_REPLICAS=2 make serve``, tiny model).

Requests sharing a long system prompt land on the replica that cached it;
unrelated prompts spread over both; greedy answers equal a single replica's
whichever replica served them; a replica SIGKILLed under streaming load hands
its requests to the other, every stream ending with exactly the tokens of an
uninterrupted run, and it takes requests again once restarted.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from protos import router_pb2 as pb
from protos import router_pb2_grpc as pb_grpc
from tests.conftest import ROOT, launched_stack, running_stack
from tests.e2e.test_crash_recovery import _run_streams

PROMPTS = [f"Item {i}: {word} " * 12 for i, word in enumerate(["river", "engine", "garden", "signal"])]
SYSTEM = "You are the archivist of a railway museum. " * 30


def _complete(url: str, prompt: str) -> str:
    body = {"model": "tgi", "prompt": prompt, "max_tokens": 12, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]


def _per_replica(url: str, name: str) -> dict[str, float]:
    """The unlabelled-but-for-replica series ``name`` (read off the text: TGI's names are exact)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.findall(rf'^{re.escape(name)}{{replica="([^"]+)"}} (\S+)$', text, re.MULTILINE)
    return {replica: float(value) for replica, value in found}


@pytest.fixture(scope="module")
def oracle(tiny_model_dir) -> list[str]:
    """Greedy answers of one replica."""
    with running_stack({"MODEL_ID": str(tiny_model_dir("llama"))}) as url:
        return [_complete(url, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def stack(tiny_model_dir) -> Iterator[tuple[str, subprocess.Popen]]:
    env = {"MODEL_ID": str(tiny_model_dir("llama")), "NUM_REPLICAS": "2"}
    with launched_stack(env) as running:
        yield running


def test_unrelated_prompts_spread_and_answer_as_one_replica_does(stack, oracle):
    url, _ = stack
    before = _per_replica(url, "tgi_request_count")
    assert [_complete(url, p) for p in PROMPTS] == oracle
    after = _per_replica(url, "tgi_request_count")
    served = {r: after[r] - before.get(r, 0) for r in ("0", "1")}
    assert served == {"0": 2, "1": 2}, served


def test_a_shared_system_prompt_stays_on_the_replica_that_cached_it(stack):
    url, _ = stack
    hits_before = _per_replica(url, "switchyard_prefix_cache_hit_tokens_total")
    count_before = _per_replica(url, "tgi_request_count")
    for i in range(4):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}]
        body = {"model": "tgi", "messages": messages, "max_tokens": 4}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code == 200
    counts = _per_replica(url, "tgi_request_count")
    hits = _per_replica(url, "switchyard_prefix_cache_hit_tokens_total")
    served = {r: counts[r] - count_before.get(r, 0) for r in ("0", "1")}
    home = max(served, key=lambda r: served[r])
    assert served[home] == 4, served
    assert hits[home] - hits_before.get(home, 0) >= 3 * 200  # the 3 later requests reused the prompt's blocks


def _shard_pid(launcher: int, replica: int) -> int | None:
    """The replica's shard process, or None between a death and the launcher's restart."""
    pattern = f"python -m shard .*replica{replica}-shard"
    out = subprocess.run(["pgrep", "-P", str(launcher), "-f", pattern], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.stdout.split() else None


def test_a_killed_replica_hands_its_streams_to_the_other_and_rejoins(stack):
    url, launcher = stack
    reference = _run_streams(url)
    assert all(exc is None and finish == "length" for _, finish, exc in reference), reference
    shard = _shard_pid(launcher.pid, 0)
    assert shard is not None
    recovered = _run_streams(url, after_tokens=8, kill=lambda: os.kill(shard, signal.SIGKILL))
    for i, ((text, finish, exc), (expected, _, _)) in enumerate(zip(recovered, reference, strict=True)):
        assert exc is None, f"stream {i} failed: {exc!r}"
        assert finish == "length" and text == expected, f"stream {i} differs from its uninterrupted run"
    deadline = time.monotonic() + 60  # the streams may end (on replica 1) before the launcher restarts it
    while _shard_pid(launcher.pid, 0) in (None, shard):
        assert time.monotonic() < deadline, "replica 0's shard was not restarted"
        time.sleep(0.2)
    assert _per_replica(url, "switchyard_shard_recoveries_total") == {"0": 1.0, "1": 0.0}
    deadline = time.monotonic() + 90  # restarted by the launcher, re-warmed by the router
    while _per_replica(url, "switchyard_shards_up").get("0") != 1.0 and time.monotonic() < deadline:
        time.sleep(0.5)
    before = _per_replica(url, "tgi_request_count")
    for p in PROMPTS:
        _complete(url, p + " again")
    after = _per_replica(url, "tgi_request_count")
    assert after["0"] > before["0"], "the restarted replica takes requests again"


def _router_metrics(address: str) -> str:
    async def fetch() -> str:
        async with grpc.aio.insecure_channel(address) as channel:
            return (await pb_grpc.RouterStub(channel).Metrics(pb.MetricsRequest(), timeout=5)).text

    return asyncio.run(fetch())


def _generate(address: str, prompt: str) -> None:
    async def call() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            params = pb.GenerationParameters(max_new_tokens=2, ignore_eos=True)
            await pb_grpc.RouterStub(channel).Generate(pb.GenerateRequest(prompt=prompt, parameters=params), timeout=30)

    asyncio.run(call())


def test_a_replica_started_after_the_router_joins_without_a_restart(tiny_model_dir, tmp_path):
    """SHARD_ADDRESSES names two replicas; only one is up at start. The other, started later, takes
    requests within a discovery round (fake shards: this is about the router)."""
    fake = [sys.executable, "-m", "benchmarks.fake_shard", "--num-blocks", "512"]
    first, late = tmp_path / "first", tmp_path / "late"
    address = f"unix://{tmp_path / 'router.sock'}"
    env = {
        **os.environ,
        "MODEL_ID": str(tiny_model_dir("llama")),
        "SHARD_ADDRESSES": f"unix://{first}-0,unix://{late}-0",
        "REPLICA_START_WAIT": "1",
    }
    procs = [subprocess.Popen([*fake, "--uds-path", str(first)], cwd=ROOT)]
    procs.append(subprocess.Popen([sys.executable, "-m", "router", "--listen", address], cwd=ROOT, env=env))
    try:
        _wait_router(address)
        _generate(address, "before")
        assert 'replica="1"' not in _router_metrics(address)  # one replica: no replica label at all
        procs.append(subprocess.Popen([*fake, "--uds-path", str(late)], cwd=ROOT))
        deadline = time.monotonic() + 30
        while 'replica="1"' not in _router_metrics(address):
            assert time.monotonic() < deadline, "the late replica never joined"
            time.sleep(0.5)
        for i in range(4):
            _generate(address, f"after {i}")
        counts = dict(re.findall(r'^tgi_request_count\{replica="(\d)"\} (\S+)$', _router_metrics(address), re.M))
        assert float(counts["1"]) >= 2, counts  # equals take turns: the newcomer gets its share
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def _wait_router(address: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _router_metrics(address)
            return
        except grpc.aio.AioRpcError:
            assert time.monotonic() < deadline, "the router did not start"
            time.sleep(0.3)
