"""Multi-LoRA serving (issue 35's benchmark): the shared workload at 16 and 64 streams on the
default model with 8 adapters of rank 16 spread over the requests, against the base model
alone, in one run (target >= 0.8x), and the cost per adapter rank.

The shared load generator sends one model name per process, so each side runs 8 of them at
once, each with an eighth of the streams: model "a0".."a7" for the adapters, "tgi" for the
base. Both sides pay the same client cost. The adapters are random PEFT adapters made here on
the default model (all seven projections of every layer), built once and cached.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine import _engine, cpu_name
from benchmarks.served import LOADGEN, serving, switchyard_argv
from common.disk_cache import cache_root
from common.model_source import default_model_dir, resolve_model
from common.ports import free_port
from shard.loading.model_loader import choose_dtype
from shard.numerics.lora import PROJECTIONS, Adapter, LoraWeights
from shard.numerics.sampling import SamplingParams
from shard.runtime.engine import NewRequest
from support.lora_adapters import build_adapter

ADAPTERS = 8
PLAN = {16: 48, 64: 128}


@dataclass(frozen=True)
class Load:
    streams: int
    tokens_per_s: float
    failed: int


def adapters(rank: int) -> dict[str, Path]:
    """ADAPTERS random adapters of ``rank`` for the default model, built once."""
    source = resolve_model(None)
    made = {}
    for i in range(ADAPTERS):
        folder = cache_root() / "bench" / f"lora-r{rank}-{i}"
        if not (folder / "adapter_model.safetensors").exists():
            build_adapter(default_model_dir(), folder, seed=100 + i, rank=rank, gguf_file=source.gguf_file, alpha=rank)
        made[f"a{i}"] = folder
    return made


def _loadgen_argv(url: str, model: str, streams: int, requests: int, seed: int, out: str) -> list[str]:
    return [
        sys.executable, str(LOADGEN), "--base-url", url, "--model", model, "--max-tokens", "128", "--ignore-eos",
        "--prompt-set", "medium", "--warmup", "1", "--concurrency", str(streams), "--num-requests", str(requests),
        "--seed", str(seed), "--json-out", out,
    ]  # fmt: skip


def _spread_load(url: str, streams: int, models: list[str], seed: int) -> Load:
    """``streams`` streams in 8 load generators at once, one model each; total tokens over the wall time."""
    each, requests = streams // len(models), PLAN[streams] // len(models)
    with tempfile.TemporaryDirectory() as out:
        argvs = [_loadgen_argv(url, m, each, requests, seed + i, f"{out}/{i}.json") for i, m in enumerate(models)]
        procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for argv in argvs]
        for p in procs:
            p.wait()
        results = [json.loads(Path(f"{out}/{i}.json").read_text())["metrics"] for i in range(len(models))]
    # Each generator's window excludes its warm-up: the total over the longest window.
    duration = max(m["duration_s"] for m in results)
    tokens = sum(m["output_throughput"] * m["duration_s"] for m in results)
    return Load(streams, tokens / duration, sum(int(m["failed"]) for m in results))


def run(seed: int = 7000, rank: int = 16) -> dict[str, dict[int, Load]]:
    made = adapters(rank)
    sides: dict[str, dict[int, Load]] = {}
    for side, env, models in (
        ("base", {}, ["tgi"] * ADAPTERS),
        ("adapters", {"LORA_ADAPTERS": ",".join(f"{n}={p}" for n, p in made.items())}, list(made)),
    ):
        port = free_port()
        with serving(f"switchyard-lora-{side}", switchyard_argv(port), port, env) as url:
            sides[side] = {c: _spread_load(url, c, models, seed + 100 * c) for c in PLAN}
    return sides


def _random_adapter(model: Any, rank: int) -> Adapter:
    """An adapter of ``rank`` on every projection of every layer, random, built in memory."""
    adapter, dtype = Adapter(f"r{rank}", rank=rank), next(model.parameters()).dtype
    for index, layer in enumerate(model.model.layers):
        for name in PROJECTIONS:
            module = layer.get_submodule(name)
            a, b = torch.randn(rank, module.in_features) * 0.01, torch.randn(module.out_features, rank) * 0.01
            adapter.modules[(index, name)] = LoraWeights.of(a, b, 1.0, dtype)
    return adapter


def rank_cost(rows: int = 16, ranks: tuple[int, ...] = (8, 16, 32, 64), steps: int = 30) -> dict[int, float]:
    """Median decode step (ms) of the engine alone on the default model, ``rows`` sequences all on
    one adapter of each rank (0: the base model), side by side in one process."""
    engine = _engine(resolve_model(None), choose_dtype(None, torch.device("cpu")), 16384)
    for rank in ranks:
        engine.adapters[f"r{rank}"] = _random_adapter(engine.model, rank)
    medians = {}
    for rank in (0, *ranks):
        prompts = [[5 + (i * 7 + j) % 3000 for j in range(64)] for i in range(rows)]
        requests = [NewRequest(i + 1, p, 0, len(p), list(range(8 * i, 8 * i + 8)), SamplingParams(), 0,
                               adapter=f"r{rank}" if rank else "") for i, p in enumerate(prompts)]  # fmt: skip
        engine.prefill(1, requests)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            engine.decode([1], {})
            times.append(time.perf_counter() - started)
        engine.clear(None)
        medians[rank] = statistics.median(times) * 1000
    return medians


def report(sides: dict[str, dict[int, Load]], cpu: str, rank: int = 16) -> str:
    lines = [f"multi-LoRA: the shared workload, {ADAPTERS} adapters of rank {rank} over the requests, on {cpu}:"]
    for streams, base in sides["base"].items():
        lora = sides["adapters"][streams]
        failed = f" ({lora.failed + base.failed} failed)" if lora.failed or base.failed else ""
        lines.append(
            f"  {streams} streams: {lora.tokens_per_s:.1f} tok/s against {base.tokens_per_s:.1f} for the base "
            f"model alone = {lora.tokens_per_s / base.tokens_per_s:.2f}x (target >= 0.8x){failed}"
        )
    return "\n".join(lines)


def rank_report(medians: dict[int, float], cpu: str, rows: int = 16) -> str:
    base = medians[0]
    costs = ", ".join(
        f"rank {r}: {ms:.1f} ms (+{ms - base:.1f} ms, {(ms - base) / r * 1000:.0f} us per rank)"
        for r, ms in medians.items() if r
    )  # fmt: skip
    return (
        f"LoRA cost per rank, engine decode step of {rows} rows on one adapter, on {cpu}: base {base:.1f} ms; {costs}"
    )


if __name__ == "__main__":
    print(rank_report(rank_cost(), cpu_name()), flush=True)
    print(report(run(), cpu_name()), flush=True)
