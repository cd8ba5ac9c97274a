"""The engine alone on the shared workload: what the stack would give if the cluster cost nothing.

The engine's decode figures (``benchmarks.engine``) time decode steps of a batch whose
prompts were computed beforehand; the shared workload's output tokens/s (loadgen) also pays
for every prompt, about twice as many tokens as the output. Setting the stack against the
decode figure therefore mixes the cost of the cluster with the cost of prefill. This
benchmark runs the same workload in-process on the engine, with no gRPC, router or HTTP:
the prompts loadgen sends (its generator, rendered with the model's chat template), 128
output tokens each, ``concurrency`` streams kept full, each new prompt admitted in chunks of
the router's CPU prompt budget alongside the running streams' decode tokens, and the
system prompt's whole blocks computed once and shared as the router's prefix cache does.
The ratio of the stack's tokens/s to this one is the cluster's cost.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from types import ModuleType

import torch

from benchmarks.engine import BLOCK
from benchmarks.served import LOADGEN, PLAN
from common.model_source import resolve_model, tokenizer_source
from router.config import CPU_PREFILL_BUDGET
from router.planner import DECODE_BLOCK_RUN, blocks_to_take
from router.tokenization import Tokenizer
from shard.config import parse_config
from shard.loading.model_loader import choose_dtype, load_model
from shard.numerics.invariant_linear import quantize_activations
from shard.numerics.sampling import SamplingParams
from shard.runtime.engine import Engine, NewRequest

#: The router's default prompt tokens per step on CPU (MAX_BATCH_PREFILL_TOKENS).
PREFILL_BUDGET = CPU_PREFILL_BUDGET
NEW_TOKENS = 128
BATCH = 1
PREFIX_BATCH = 2  # holds the shared system prompt's blocks; never decoded


def _loadgen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loadgen", LOADGEN)
    if spec is None or spec.loader is None:
        raise SystemExit(f"the shared load generator is not at {LOADGEN}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def workload_prompts(tokenizer: Tokenizer, count: int, seed: int) -> list[list[int]]:
    """Token ids of the chat prompts loadgen sends (its medium set, with its system prompt)."""
    loadgen = _loadgen()
    prompts = []
    for p in loadgen.make_prompt_set("medium", count, seed):
        messages = [{"role": "system", "content": loadgen._SYSTEM}, {"role": "user", "content": p.text}]
        prompts.append(tokenizer.encode(tokenizer.render_chat(messages), add_special_tokens=False))
    return prompts


@dataclass
class _Stream:
    rid: int
    ids: list[int]
    blocks: list[int]
    computed: int
    generated: int = 0


@dataclass
class _Replay:
    """Continuous batching of a fixed request list on the engine, as the router plans it."""

    engine: Engine
    concurrency: int
    shared: list[int]  # blocks of the common prefix (whole blocks), computed once
    free: list[int] = field(default_factory=list)
    active: dict[int, _Stream] = field(default_factory=dict)
    tokens: int = 0

    def admit(self, waiting: deque[tuple[int, list[int]]], budget: int) -> list[NewRequest]:
        """Prompt chunks within ``budget``: prompts part-way first, then new streams."""
        chunks = []
        for s in self.active.values():
            if s.computed < len(s.ids) and budget > 0:
                chunks.append(self._chunk(s, budget))
                budget -= chunks[-1].chunk_len
        while waiting and budget > 0 and len(self.active) < self.concurrency:
            rid, ids = waiting.popleft()
            cached = len(self.shared) * BLOCK
            s = _Stream(rid, ids, list(self.shared), cached)
            self.active[rid] = s
            chunks.append(self._chunk(s, budget))
            budget -= chunks[-1].chunk_len
        return chunks

    def _chunk(self, s: _Stream, budget: int) -> NewRequest:
        start, n = s.computed, min(len(s.ids) - s.computed, budget)
        s.blocks += self._take(-(-(start + n) // BLOCK) - len(s.blocks))
        s.computed += n
        return NewRequest(s.rid, s.ids, start, n, list(s.blocks), SamplingParams(), 0)

    def _take(self, count: int) -> list[int]:
        taken, self.free = self.free[:count], self.free[count:]
        if len(taken) < count:
            raise RuntimeError("the benchmark's KV cache is too small")
        return taken

    def step(self, chunks: list[NewRequest]) -> None:
        chunked = {c.request_id for c in chunks}
        extensions = {}
        for s in self.active.values():
            if s.rid not in chunked and s.generated:
                s.computed += 1
                needed = -(-s.computed // BLOCK) - len(s.blocks)
                if needed > 0:  # a run, as the router's scheduler takes them
                    fillable = -(-(len(s.ids) + NEW_TOKENS - 1) // BLOCK) - len(s.blocks)
                    spare = len(self.free) - len(self.active) * DECODE_BLOCK_RUN
                    extensions[s.rid] = self._take(blocks_to_take(needed, fillable, spare))
                    s.blocks += extensions[s.rid]
        if any(s.generated for s in self.active.values()):
            result = self.engine.decode([BATCH], extensions, chunks)
        else:  # nothing decodes: a Prefill, as the router sends
            result = self.engine.prefill(BATCH, chunks)
        done = []
        for g in result.generations:
            s = self.active[g.request_id]
            s.generated += 1
            self.tokens += 1
            if s.generated == NEW_TOKENS:
                done.append(s)
        for s in done:
            del self.active[s.rid]
            self.free += s.blocks[len(self.shared) :]
        if done:
            self.engine.filter(BATCH, list(self.active))


def workload_rate(engine: Engine, prompts: list[list[int]], concurrency: int) -> float:
    """Output tokens/s of the engine serving ``prompts`` with ``concurrency`` streams."""
    engine.clear(None)
    common = _common_prefix(prompts)
    shared_len = (common - 1) // BLOCK * BLOCK  # whole blocks, leaving each prompt a token to compute
    free = list(range(engine.cache.num_blocks if engine.cache else 0))
    shared = free[: shared_len // BLOCK]
    replay = _Replay(engine, concurrency, shared, free[len(shared) :])
    if shared:
        prefix = NewRequest(0, prompts[0][:shared_len], 0, shared_len, shared, SamplingParams(), 0)
        engine.prefill(PREFIX_BATCH, [prefix])
    waiting = deque((i + 1, ids) for i, ids in enumerate(prompts))
    started = time.perf_counter()
    while waiting or replay.active:
        replay.step(replay.admit(waiting, PREFILL_BUDGET))
    elapsed = time.perf_counter() - started
    engine.clear(None)
    return replay.tokens / elapsed


def _common_prefix(prompts: list[list[int]]) -> int:
    first, n = prompts[0], len(prompts[0])
    for ids in prompts[1:]:
        n = next((i for i, (a, b) in enumerate(zip(first[:n], ids[:n], strict=False)) if a != b), min(n, len(ids)))
    return n


def run(seed: int = 5000, plan: dict[int, int] | None = None) -> dict[int, float]:
    """Output tokens/s at each of the stack benchmark's loads (same request counts unless ``plan``
    gives others), with the model, dtype, storage and activations ``make serve`` uses (MODEL_ID,
    QUANTIZE, QUANTIZED_ACTIVATIONS and the KV cache's mapping read from the environment, as a
    served shard reads them)."""
    served = parse_config([], os.environ)
    source = resolve_model(served.model_id)
    model = load_model(
        source, choose_dtype(served.dtype, torch.device("cpu")), torch.device("cpu"), quantize=served.quantize
    )
    if served.quantized_activations:
        quantize_activations(model)
    engine = Engine(
        model, torch.device("cpu"), BLOCK, kv_fraction=0.5,
        kv_prefault=served.kv_prefault, kv_prefault_ready_s=served.kv_prefault_ready_s,
    )  # fmt: skip
    engine.warmup(PREFILL_BUDGET, max(PLAN), max(PLAN) * 640)
    tokenizer = Tokenizer.load(tokenizer_source(source))
    loads = PLAN if plan is None else plan
    return {c: workload_rate(engine, workload_prompts(tokenizer, n, seed + c), c) for c, n in loads.items()}
