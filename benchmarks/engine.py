"""The shard engine against transformers' ``generate``, same model, same dtype, same machine, same run.

Figures (issue 7's targets in brackets):
- single-sequence decode tokens/s, engine vs ``generate`` [>= 3x], as served (the default
  model's Q4_1 linears on their int4 values for small steps) and with bf16 weights only;
- decode tokens/s with 64 live sequences (~200-token prompts, 128 new tokens each)
  vs single-request ``generate`` [>= 25x];
- prefill tokens/s for a 512-token prompt [>= 2,000].
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from common.model_source import ModelSource, resolve_model
from shard.engine import Engine, NewRequest
from shard.model_loader import choose_dtype, load_model
from shard.sampling import SamplingParams

BLOCK = 16


def _prompt(length: int, salt: int) -> list[int]:
    return [(1000 + 7 * i + 13 * salt) % 40000 + 100 for i in range(length)]


class _Runner:
    """Drives the engine like the router: blocks handed out in order."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.next_block = 0
        self.blocks: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def _grow(self, rid: int, tokens: int) -> list[int]:
        new = []
        while len(self.blocks[rid]) * BLOCK < tokens:
            self.blocks[rid].append(self.next_block)
            new.append(self.next_block)
            self.next_block += 1
        return new

    def prefill(self, prompts: dict[int, list[int]]) -> None:
        requests = []
        for rid, prompt in prompts.items():
            self.blocks[rid] = []
            self._grow(rid, len(prompt))
            self.lengths[rid] = len(prompt)
            requests.append(NewRequest(rid, prompt, 0, len(prompt), list(self.blocks[rid]), SamplingParams(), 0))
        self.engine.prefill(1, requests)

    def decode(self) -> int:
        extensions = {}
        for rid in self.blocks:
            self.lengths[rid] += 1
            extensions[rid] = self._grow(rid, self.lengths[rid])
        return len(self.engine.decode([1], extensions).generations)


def _engine(source: ModelSource, dtype: torch.dtype, total_tokens: int, quantize: str = "auto") -> Engine:
    model = load_model(source, dtype, torch.device("cpu"), quantize=quantize)
    engine = Engine(model, torch.device("cpu"), BLOCK, kv_fraction=0.5)
    engine.warmup(1024, 64, total_tokens)
    return engine


def engine_decode_rate(engine: Engine, streams: int, prompt_len: int, new_tokens: int) -> float:
    engine.clear(None)
    runner = _Runner(engine)
    prompts = {i + 1: _prompt(prompt_len, i) for i in range(streams)}
    for start in range(0, streams, 8):  # prefill in groups, as the router would under its budget
        runner.prefill({rid: prompts[rid] for rid in list(prompts)[start : start + 8]})
    started = time.perf_counter()
    generated = sum(runner.decode() for _ in range(new_tokens - 1))
    return generated / (time.perf_counter() - started)


def engine_prefill_rate(engine: Engine, prompt_len: int) -> float:
    engine.clear(None)
    runner = _Runner(engine)
    started = time.perf_counter()
    runner.prefill({1: _prompt(prompt_len, 99)})
    return prompt_len / (time.perf_counter() - started)


def generate_rate(source: ModelSource, dtype: torch.dtype, prompt_len: int, new_tokens: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(source.path_or_id, **source.pretrained_kwargs(), dtype=dtype).eval()
    ids = torch.tensor([_prompt(prompt_len, 0)])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        elapsed = time.perf_counter() - started
    return (out.shape[1] - prompt_len) / elapsed


def run(rounds: int = 3, streams: int = 64, prompt_len: int = 200, new_tokens: int = 128) -> dict[str, float]:
    source = resolve_model(None)
    dtype = choose_dtype(None, torch.device("cpu"))
    total_tokens = (streams + 1) * (prompt_len + new_tokens + BLOCK) + 1024
    engine = _engine(source, dtype, total_tokens)  # as served: QUANTIZE=auto
    bf16_only = _engine(source, dtype, 4096, quantize="none")
    figures: dict[str, list[float]] = {
        "generate_1": [],
        "engine_1": [],
        "engine_1_unquantized": [],
        "engine_16": [],
        f"engine_{streams}": [],
        "prefill_512": [],
    }
    for _ in range(rounds):
        figures["generate_1"].append(generate_rate(source, dtype, prompt_len, new_tokens))
        figures["engine_1"].append(engine_decode_rate(engine, 1, prompt_len, new_tokens))
        figures["engine_1_unquantized"].append(engine_decode_rate(bf16_only, 1, prompt_len, new_tokens))
        figures["engine_16"].append(engine_decode_rate(engine, 16, prompt_len, new_tokens))
        figures[f"engine_{streams}"].append(engine_decode_rate(engine, streams, prompt_len, new_tokens))
        figures["prefill_512"].append(engine_prefill_rate(engine, 512))
    medians = {k: statistics.median(v) for k, v in figures.items()}
    medians["dtype"] = str(dtype)  # type: ignore[assignment]
    return medians


def report(m: dict[str, float]) -> str:
    g, one, many = m["generate_1"], m["engine_1"], m["engine_64"]
    return "\n".join(
        [
            f"engine benchmark (SmolLM2-135M, {m['dtype']}, medians of 3 rounds, same run):",
            f"  transformers generate, 1 request:  {g:8.1f} tok/s",
            f"  engine decode, 1 sequence:          {one:8.1f} tok/s  ({one / g:.1f}x; target 3x)",
            f"    same, QUANTIZE=none (bf16 only):  {m['engine_1_unquantized']:8.1f} tok/s  "
            f"({m['engine_1_unquantized'] / g:.1f}x)",
            f"  engine decode, 16 sequences:        {m['engine_16']:8.1f} tok/s  ({m['engine_16'] / g:.1f}x)",
            f"  engine decode, 64 sequences:        {many:8.1f} tok/s  ({many / g:.1f}x; target 25x)",
            f"  engine prefill, 512-token prompt:   {m['prefill_512']:8.1f} tok/s  (target 2000)",
        ]
    )


if __name__ == "__main__":
    print(report(run()))
