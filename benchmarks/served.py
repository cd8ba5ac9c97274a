"""The shared workload (``../shared/bench/loadgen.py``) against a served stack, as users see it.

Every stack figure we publish comes from that one load generator, the one the peer
figures in our issues were measured with: 128 output tokens per request (end of
sequence ignored), prompts of about 100-300 tokens with a system prompt, streamed
through the OpenAI chat API. A server runs alone on the machine while it is
measured; the client runs on the same cores for every server alike, and the CPU
time it took is reported next to the figures.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
#: The workplace's shared load generator; LOADGEN overrides where it lives.
LOADGEN = Path(os.environ.get("LOADGEN") or ROOT.parent / "shared" / "bench" / "loadgen.py")
#: Concurrency -> number of requests, as the issues' peer figures were measured.
PLAN = {1: 8, 16: 48, 64: 128}


@dataclass(frozen=True)
class Figures:
    concurrency: int
    completed: int
    failed: int
    tokens_per_s: float
    ttft_p50_ms: float
    itl_p50_ms: float
    client_cpu_s: float
    duration_s: float


def loadgen(
    url: str, concurrency: int, seed: int, prompt_set: str = "medium", max_tokens: int = 128,
    requests: int | None = None, texts: list[str] | None = None,
) -> Figures:  # fmt: skip
    """One run of the shared workload (``prompt_set``: medium, or grounded for speculation); a
    fresh seed per run so no prefix cache is flattered. ``texts``, when given, receives each
    request's generated text, in request order."""
    if not LOADGEN.exists():
        raise SystemExit(f"the shared load generator is not at {LOADGEN}: set LOADGEN=/path/to/loadgen.py")
    count = requests or PLAN.get(concurrency, 3 * concurrency)
    keep = ["--save-requests", "--save-text"] if texts is not None else []
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cpu_before = _children_cpu()
        subprocess.run(
            [sys.executable, str(LOADGEN), "--base-url", url, "--model", "tgi", "--max-tokens", str(max_tokens),
             "--ignore-eos", "--prompt-set", prompt_set, "--warmup", "2", "--concurrency", str(concurrency),
             "--num-requests", str(count), "--seed", str(seed), "--json-out", out.name, *keep],
            check=True, capture_output=True,
        )  # fmt: skip
        result = json.loads(Path(out.name).read_text())
        m = result["metrics"]
        if texts is not None:
            texts += [r["generated_text"] for r in sorted(result["requests"], key=lambda r: r["index"])]
    return Figures(
        concurrency,
        int(m["completed"]),
        int(m["failed"]),
        float(m["output_throughput"]),
        float(m["ttft_ms"]["median"]),
        float(m["itl_ms"]["median"]),
        _children_cpu() - cpu_before,
        float(m["duration_s"]),
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def serving(name: str, argv: Sequence[str], port: int, env: dict[str, str] | None = None,
            timeout_s: float = 900.0) -> Iterator[str]:  # fmt: skip
    """Starts a server in its own process group; yields its base URL once /v1/models answers."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    log = Path(tempfile.gettempdir()) / f"bench-{slug}-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            list(argv), cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log, timeout_s)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its children too), SIGKILL after a minute."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except ProcessLookupError:  # it had already exited
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name}: the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def switchyard_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "launcher", "--port", str(port), "--hostname", "127.0.0.1"]


def measure(url: str, concurrencies: Sequence[int], seed: int) -> list[Figures]:
    return [loadgen(url, c, seed + i) for i, c in enumerate(concurrencies)]


def row(server: str, f: Figures) -> str:
    failures = f" ({f.failed} failed)" if f.failed else ""
    return (
        f"| {server} | {f.concurrency} | {f.tokens_per_s:.1f}{failures} | {f.ttft_p50_ms:,.0f} | {f.itl_p50_ms:.1f} "
        f"| {f.client_cpu_s:.1f} s of {f.duration_s:.0f} s |"
    )


TABLE_HEAD = (
    "| server | streams | output tok/s | TTFT p50 (ms) | ITL p50 (ms) | client CPU |\n|---|---|---|---|---|---|"
)


def run(seed: int = 1000) -> dict[int, Figures]:
    """Switchyard as ``make serve`` runs it, under the shared workload at 1, 16 and 64 streams."""
    port = free_port()
    with serving("switchyard", switchyard_argv(port), port) as url:
        return {f.concurrency: f for f in measure(url, list(PLAN), seed)}


def report(
    figures: dict[int, Figures], engine_decode: dict[str, float], cpu: str, engine_workload: dict[int, float]
) -> str:
    """The table; each load's throughput against the engine alone on the same workload
    (``benchmarks.engine_workload``: the cluster's cost) and against the engine's decode of
    that many sequences (which leaves out the prompts)."""
    lines = [f"through the stack (make serve), shared workload, on {cpu}:", TABLE_HEAD]
    lines += [row("Switchyard", f) for f in figures.values()]
    for streams, alone in engine_workload.items():
        if streams in figures:
            lines.append(
                f"  {streams} streams: {figures[streams].tokens_per_s:.1f} tok/s through the stack = "
                f"{figures[streams].tokens_per_s / alone:.0%} of the engine alone on the same workload "
                f"({alone:.1f} tok/s in-process, same run)"
            )
    for streams in (16, 64):
        engine = engine_decode.get(f"decode_{streams}")
        if engine and streams in figures:
            ratio = figures[streams].tokens_per_s / engine
            lines.append(
                f"  {streams} streams: {figures[streams].tokens_per_s:.1f} tok/s through the stack = {ratio:.0%} of "
                f"the engine's decode of {streams} sequences whose prompts were computed beforehand "
                f"({engine:.1f} tok/s, same run; issue 13's target >= 95%)"
            )
    return "\n".join(lines)
