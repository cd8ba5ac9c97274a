"""The in-process replay of the shared workload (benchmarks.engine_workload) serves every request."""

from __future__ import annotations

import random

from benchmarks import engine_workload
from benchmarks.engine import BLOCK
from common.model_source import resolve_model
from tests.shard.engine_driver import make_engine


def test_the_replay_serves_every_prompt_in_full(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(engine_workload, "NEW_TOKENS", 5)
    monkeypatch.setattr(engine_workload, "PREFILL_BUDGET", 40)  # several prompts take chunks
    engine = make_engine(resolve_model(str(tiny_model_dir("llama"))), block_size=BLOCK)
    rng = random.Random(3)
    system = [rng.randrange(5, 500) for _ in range(37)]  # two whole blocks shared
    prompts = [system + [rng.randrange(5, 500) for _ in range(rng.randrange(1, 60))] for _ in range(7)]
    served, streams = [], []
    original = engine_workload._Replay.step

    def step(self, chunks):  # type: ignore[no-untyped-def]
        original(self, chunks)
        served.append(self.tokens)
        streams.append(len(self.active))

    monkeypatch.setattr(engine_workload._Replay, "step", step)
    rate = engine_workload.workload_rate(engine, prompts, concurrency=3)
    assert rate > 0 and served[-1] == 7 * 5  # every request, all of its tokens
    assert max(streams) == 3 and streams[-1] == 0
