"""One numerical path: a request's tokens and logprobs depend only on its own input, parameters and seed.

A property test over random schedules on the real engine (tiny Llama and Qwen2
models in float32, bfloat16, and bfloat16 with 4-bit weight storage; a tiny
Mixtral): a probe request runs among random companions that join and leave at
random steps, with its prompt prefilled in chunks of a random size, part of it
read from blocks another request computed (a prefix-cache hit), and possibly
preempted and recomputed from its prompt plus the tokens it had generated. Its
token ids, logprobs and top alternatives must equal, bit for bit, those of the
same request run alone, prefilled in one step, with a cold cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.model_source import resolve_model
from shard.numerics.sampling import SamplingParams
from shard.runtime.engine import Engine, Generation, NewRequest
from tests.shard.engine_driver import make_engine

BATCH = 1
NEW_TOKENS = 10
PROBE_PROMPT = [(37 * i + 11) % 4000 + 100 for i in range(29)]
PROBES = {
    "greedy": SamplingParams(temperature=0.0, top_n_tokens=3),
    "seeded": SamplingParams(temperature=1.0, seed=1234, top_n_tokens=3),
    "filtered": SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=99, top_n_tokens=2),
}


@dataclass
class Seq:
    rid: int
    prompt: list[int]
    params: SamplingParams
    chunk: int
    max_new: int
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    #: Generated tokens that ended ``prompt`` after a preemption.
    sampled_before: int = 0

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.prompt)

    @property
    def done(self) -> bool:
        return self.sampled_before + len(self.tokens) >= self.max_new


class Schedule:
    """Plays the router against an Engine: prefill chunks, then a decode step, every iteration."""

    def __init__(self, engine: Engine):
        engine.clear(None)
        self.engine = engine
        self.next_block = 0
        self.live: dict[int, Seq] = {}
        #: Requests the engine holds (admitted ones join it with their first chunk).
        self.sent: set[int] = set()

    def grow(self, seq: Seq, tokens: int) -> list[int]:
        new = []
        while len(seq.blocks) * self.engine.block_size < tokens:
            seq.blocks.append(self.next_block)
            new.append(self.next_block)
            self.next_block += 1
        return new

    def admit(self, seq: Seq, shared_blocks: list[int] | None = None) -> None:
        """``shared_blocks``: full blocks of another request holding this prompt's first tokens."""
        if shared_blocks:
            seq.blocks = list(shared_blocks)
            seq.computed = len(shared_blocks) * self.engine.block_size
        self.live[seq.rid] = seq

    def iteration(self) -> None:
        chunks = []
        for seq in self.live.values():
            if not seq.prefilled:
                n = min(seq.chunk, len(seq.prompt) - seq.computed)
                self.grow(seq, seq.computed + n)
                chunks.append((seq, n))
        if chunks:
            requests = [
                NewRequest(s.rid, s.prompt, s.computed, n, list(s.blocks), s.params, s.sampled_before)
                for s, n in chunks
            ]
            result = self.engine.prefill(BATCH, requests)
            self.sent.update(s.rid for s, _ in chunks)
            for seq, n in chunks:
                seq.computed += n
            self.record(result.generations)
        self.retire()
        extensions = {}
        for seq in self.live.values():
            if seq.prefilled and seq.tokens:
                extensions[seq.rid] = self.grow(seq, seq.computed + 1)
        if extensions:
            result = self.engine.decode([BATCH], extensions)
            for g in result.generations:
                self.live[g.request_id].computed += 1
            self.record(result.generations)
        self.retire()

    def record(self, generations: list[Generation]) -> None:
        for g in generations:
            seq = self.live[g.request_id]
            seq.tokens.append(g.token_id)
            seq.logprobs.append(g.logprob)
            seq.top.append(g.top)

    def retire(self) -> None:
        finished = [rid for rid, s in self.live.items() if s.done]
        for rid in finished:
            del self.live[rid]
        if finished:
            self.drop(finished)

    def drop(self, rids: list[int]) -> None:
        self.sent -= set(rids)
        self.engine.filter(BATCH, [rid for rid in self.live if rid in self.sent])

    def preempt(self, seq: Seq) -> Seq:
        """Drops ``seq`` (its blocks with it) and readmits it as a prompt of everything it has so far."""
        del self.live[seq.rid]
        self.drop([seq.rid])
        again = Seq(seq.rid, seq.prompt + seq.tokens, seq.params, seq.chunk, seq.max_new)
        again.sampled_before = seq.sampled_before + len(seq.tokens)
        again.tokens, again.logprobs, again.top = [], [], []
        self.admit(again)
        return again


@dataclass(frozen=True)
class Companion:
    prompt_len: int
    join: int
    max_new: int
    chunk: int
    seed: int
    temperature: float


companions = st.lists(
    st.builds(
        Companion,
        prompt_len=st.integers(1, 40),
        join=st.integers(0, 8),
        max_new=st.integers(1, 12),
        chunk=st.integers(1, 48),
        seed=st.integers(0, 2**40),
        temperature=st.sampled_from([0.0, 0.7, 1.0]),
    ),
    max_size=6,
)


def run_probe(
    engine: Engine,
    params: SamplingParams,
    chunk: int,
    others: list[Companion],
    probe_join: int = 0,
    cached_blocks: int = 0,
    preempt_after: int = 0,
) -> Seq:
    schedule = Schedule(engine)
    shared: list[int] | None = None
    if cached_blocks:
        # Another request with the same prompt ran first; its full blocks stay in the cache.
        donor = Seq(10_000, list(PROBE_PROMPT), SamplingParams(), chunk=17, max_new=2)
        schedule.admit(donor)
        while donor.rid in schedule.live:
            schedule.iteration()
        shared = donor.blocks[:cached_blocks]
    probe = Seq(1, list(PROBE_PROMPT), params, chunk, NEW_TOKENS)
    pending = sorted(
        (
            (c.join, Seq(100 + i, [(13 * j + 7 * i) % 3000 + 50 for j in range(c.prompt_len)],
                         SamplingParams(temperature=c.temperature, seed=c.seed), c.chunk, c.max_new))
            for i, c in enumerate(others)
        ),
        key=lambda item: item[0],
    )  # fmt: skip
    outputs = Seq(probe.rid, list(PROBE_PROMPT), params, chunk, NEW_TOKENS)
    for step in range(200):
        if step == probe_join:
            schedule.admit(probe, shared)
        while pending and pending[0][0] <= step:
            schedule.admit(pending.pop(0)[1])
        if preempt_after and len(probe.tokens) >= preempt_after and probe.rid in schedule.live and not probe.done:
            again = schedule.preempt(probe)
            _collect(outputs, probe)
            probe, preempt_after = again, 0
        schedule.iteration()
        if probe.done and probe.rid not in schedule.live:
            break
    _collect(outputs, probe)
    return outputs


def _collect(outputs: Seq, probe: Seq) -> None:
    outputs.tokens += probe.tokens
    outputs.logprobs += probe.logprobs
    outputs.top += probe.top
    probe.tokens, probe.logprobs, probe.top = [], [], []


@pytest.fixture(
    scope="module",
    params=[
        "llama-float32-none", "qwen2-bfloat16-none", "llama-bfloat16-int4", "mixtral-float32-none",
        "gguf-float32-auto", "gguf-bfloat16-auto", "gguf-float32-auto-int8",
    ],
)  # fmt: skip
def engine_and_references(request, tiny_model_dir):
    """float32; bf16 (Qwen2: biases); bf16 with every linear stored as 4-bit values (QUANTIZE=int4);
    a mixture of experts (Mixtral: experts and router); a GGUF file's own blocks of every stored
    type (support.gguf_files), in float32 and bf16, and with int8 activations (QUANTIZED_ACTIVATIONS)."""
    kind, dtype_name, quantize, *activations = request.param.split("-")
    source = resolve_model(str(tiny_model_dir(kind)))
    engine = make_engine(
        source, dtype=getattr(torch, dtype_name), quantize=quantize, int8_activations=activations == ["int8"]
    )
    references = {
        name: run_probe(engine, params, chunk=len(PROBE_PROMPT), others=[]) for name, params in PROBES.items()
    }
    return engine, references


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    probe=st.sampled_from(sorted(PROBES)),
    chunk=st.integers(1, len(PROBE_PROMPT)),
    others=companions,
    probe_join=st.integers(0, 4),
    cached_blocks=st.integers(0, (len(PROBE_PROMPT) - 1) // 4),
    preempt_after=st.integers(0, NEW_TOKENS - 1),
)
def test_a_request_is_the_same_bits_whatever_the_schedule(
    engine_and_references, probe, chunk, others, probe_join, cached_blocks, preempt_after
):
    engine, references = engine_and_references
    assert engine.block_size == 4
    got = run_probe(engine, PROBES[probe], chunk, others, probe_join, cached_blocks, preempt_after)
    want = references[probe]
    assert got.tokens == want.tokens
    assert got.logprobs == want.logprobs  # exact: float equality, not approx
    assert got.top == want.top
