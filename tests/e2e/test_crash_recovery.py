"""SIGKILL of each process under streaming load, through ``python -m launcher`` (tiny model).

A killed shard is invisible to clients: the launcher restarts it, the router
re-warms it and recomputes every running request, and each stream ends with
exactly the tokens of an uninterrupted run. A killed router or facade loses the
requests it held (they end cleanly), and the stack serves again within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import launched_stack

STREAMS = 4
TOKENS = 48


@pytest.fixture(scope="module")
def stack(tiny_model_dir) -> Iterator[tuple[str, subprocess.Popen]]:
    env = {"MODEL_ID": str(tiny_model_dir("llama")), "SHARD_RECOVERY_TIMEOUT": "60"}
    with launched_stack(env) as running:
        yield running


def _child_pid(parent: int, module: str) -> int:
    out = subprocess.run(["pgrep", "-P", str(parent), "-f", f"python -m {module}( |$)"], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def _request(i: int) -> dict:
    # Seeded sampling and greedy decoding both: each must resume exactly.
    sampling = {"temperature": 0.9, "seed": 100 + i} if i % 2 else {"temperature": 0.0}
    return {
        "model": "tgi",
        "messages": [{"role": "user", "content": f"Story number {i}: tell it at length."}],
        "max_tokens": TOKENS,
        "stream": True,
        "extra_body": {"ignore_eos": True},
        **sampling,
    }


def _run_streams(url: str, after_tokens: int = 0, kill=None) -> list[tuple[str, str | None, BaseException | None]]:
    """Runs STREAMS chat streams at once; ``kill()`` runs once any stream has ``after_tokens`` chunks."""
    client = openai.OpenAI(base_url=f"{url}/v1/", api_key="-", max_retries=0, timeout=120)
    results: list = [None] * STREAMS
    progress = [0] * STREAMS
    started = threading.Event()

    def one(i: int) -> None:
        text, finish = [], None
        try:
            for chunk in client.chat.completions.create(**_request(i)):
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
                    progress[i] += 1
                    if progress[i] >= after_tokens:
                        started.set()
            results[i] = ("".join(text), finish, None)
        except BaseException as exc:
            results[i] = ("".join(text), finish, exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    if kill is not None:
        assert started.wait(120), "no stream got going"
        assert max(progress) < TOKENS, "the streams ended before the kill"
        kill()
    for t in threads:
        t.join(180)
    return results


def _wait_healthy(url: str, timeout_s: float = 90.0) -> tuple[float, list[httpx.Response]]:
    """Seconds until /health is 200, and the non-200 answers seen meanwhile."""
    started, refusals = time.monotonic(), list[httpx.Response]()
    while time.monotonic() - started < timeout_s:
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200:
                return time.monotonic() - started, refusals
            refusals.append(r)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not healthy again within {timeout_s}s")


def test_a_killed_shard_is_invisible_to_streams(stack):
    url, launcher = stack
    reference = _run_streams(url)
    assert all(exc is None and finish == "length" for _, finish, exc in reference), reference
    shard = _child_pid(launcher.pid, "shard")
    recovered = _run_streams(url, after_tokens=8, kill=lambda: os.kill(shard, signal.SIGKILL))
    assert _child_pid(launcher.pid, "shard") != shard  # it really was replaced
    for i, ((text, finish, exc), (expected, _, _)) in enumerate(zip(recovered, reference, strict=True)):
        assert exc is None, f"stream {i} failed: {exc!r}"
        assert finish == "length"
        assert text == expected, f"stream {i} differs from its uninterrupted run"
    metrics = httpx.get(f"{url}/metrics").text
    assert "switchyard_shard_recoveries_total 1.0" in metrics


def test_a_killed_router_ends_streams_cleanly_and_comes_back(stack):
    url, launcher = stack
    router = _child_pid(launcher.pid, "router")
    results = _run_streams(url, after_tokens=4, kill=lambda: os.kill(router, signal.SIGKILL))
    for _, finish, exc in results:
        if exc is None:  # a stream that finished before the kill
            assert finish == "length"
            continue
        assert isinstance(exc, openai.APIError), repr(exc)
        message = str(exc)
        assert "unix:" not in message and ".sock" not in message and "AioRpcError" not in message, message
    assert any(exc is not None for _, _, exc in results)
    _, refusals = _wait_healthy(url)
    assert refusals, "the router came back before /health was asked"
    assert all(r.status_code == 503 and r.headers.get("Retry-After") == "1" for r in refusals)
    answer = _run_streams(url)
    assert all(exc is None and finish == "length" for _, finish, exc in answer), answer


def test_a_killed_facade_is_restarted_and_frees_what_it_held(stack):
    url, launcher = stack
    facade = _child_pid(launcher.pid, "facade")
    results = _run_streams(url, after_tokens=4, kill=lambda: os.kill(facade, signal.SIGKILL))
    assert any(exc is not None for _, _, exc in results)  # the connections dropped with the process
    waited, _ = _wait_healthy(url)
    assert waited < 30
    for _ in range(50):  # the router saw the calls cancelled and freed their KV blocks
        used = [
            line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("tgi_batch_current_size")
        ]
        if used == ["tgi_batch_current_size 0.0"]:
            break
        time.sleep(0.1)
    assert used == ["tgi_batch_current_size 0.0"], used
    answer = _run_streams(url)
    assert all(exc is None and finish == "length" for _, finish, exc in answer), answer
    assert launcher.poll() is None
