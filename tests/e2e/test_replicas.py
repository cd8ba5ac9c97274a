"""Two model replicas behind one router (``NUM_REPLICAS=2 make serve``, tiny model).

Requests sharing a long system prompt land on the replica that cached it;
unrelated prompts spread over both; greedy answers equal a single replica's
whichever replica served them; a replica SIGKILLed under streaming load hands
its requests to the other, every stream ending with exactly the tokens of an
uninterrupted run, and it takes requests again once restarted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import launched_stack, running_stack
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


def _shard_pid(launcher: int, replica: int) -> int:
    pattern = f"python -m shard .*replica{replica}-shard"
    out = subprocess.run(["pgrep", "-P", str(launcher), "-f", pattern], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def test_a_killed_replica_hands_its_streams_to_the_other_and_rejoins(stack):
    url, launcher = stack
    reference = _run_streams(url)
    assert all(exc is None and finish == "length" for _, finish, exc in reference), reference
    shard = _shard_pid(launcher.pid, 0)
    recovered = _run_streams(url, after_tokens=8, kill=lambda: os.kill(shard, signal.SIGKILL))
    for i, ((text, finish, exc), (expected, _, _)) in enumerate(zip(recovered, reference, strict=True)):
        assert exc is None, f"stream {i} failed: {exc!r}"
        assert finish == "length" and text == expected, f"stream {i} differs from its uninterrupted run"
    assert _shard_pid(launcher.pid, 0) != shard
    assert _per_replica(url, "switchyard_shard_recoveries_total") == {"0": 1.0, "1": 0.0}
    deadline = time.monotonic() + 90  # restarted by the launcher, re-warmed by the router
    while _per_replica(url, "switchyard_shards_up").get("0") != 1.0 and time.monotonic() < deadline:
        time.sleep(0.5)
    before = _per_replica(url, "tgi_request_count")
    for p in PROMPTS:
        _complete(url, p + " again")
    after = _per_replica(url, "tgi_request_count")
    assert after["0"] > before["0"], "the restarted replica takes requests again"
