"""The shard engine, side by side in one run with the engine before the one-numerical-path change.

Issue 12 made every step compute a token the same way (step-invariant linear
kernel, one attention path, per-row reductions, quantized storage at every step
size, no compiled decode graph). Its floors, against the engine of commit
``BASELINE`` measured here in the same run from a temporary git worktree:
single-sequence decode >= 90%, 64 sequences >= 95%, and prefill of a 512-token
prompt >= 2,000 tokens/s. Both engines serve as configured by default (dtype by
CPU, ``QUANTIZE=auto``); each runs in its own process, after the other. The CPU
is named next to the figures, since these machines change between runs. The
figures against transformers' ``generate`` (issue 7's ratios) are kept.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from common.model_source import ModelSource, resolve_model
from shard.loading.model_loader import choose_dtype, load_model
from shard.numerics.sampling import SamplingParams
from shard.runtime.engine import Engine, NewRequest

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


#: The engine before issue 12 (one numerical path): what the floors are measured against.
BASELINE = "f8507bb5fb52de4caa6a8af6328e24519a74c687"
ROOT = Path(__file__).resolve().parent.parent
STREAMS, PROMPT_LEN, NEW_TOKENS = 64, 200, 128

# Runs in either tree: it uses only functions whose signatures both trees share.
_ROUNDS = """
import json, statistics, sys, torch
from benchmarks.engine import _engine, engine_decode_rate, engine_prefill_rate
from common.model_source import resolve_model
from shard.loading.model_loader import choose_dtype
rounds, streams, prompt_len, new_tokens = (int(a) for a in sys.argv[1:5])
dtype = choose_dtype(None, torch.device("cpu"))
engine = _engine(resolve_model(None), dtype, (streams + 1) * (prompt_len + new_tokens + 16) + 1024)
figures = {"decode_1": [], "decode_16": [], "decode_64": [], "prefill_512": []}
for _ in range(rounds):
    figures["decode_1"].append(engine_decode_rate(engine, 1, prompt_len, new_tokens))
    figures["decode_16"].append(engine_decode_rate(engine, 16, prompt_len, new_tokens))
    figures["decode_64"].append(engine_decode_rate(engine, streams, prompt_len, new_tokens))
    figures["prefill_512"].append(engine_prefill_rate(engine, 512))
medians = {k: statistics.median(v) for k, v in figures.items()}
print("FIGURES " + json.dumps({**medians, "dtype": str(dtype)}))
"""


def cpu_name() -> str:
    """The CPU's model and the instruction sets that decide the speed paths."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line for line in info.splitlines() if line.startswith("flags")), "").split())
    features = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{model} ({', '.join(features) or 'no AVX2'})"


def engine_in(tree: Path, rounds: int) -> dict[str, float]:
    """Medians of ``rounds`` rounds of the engine of ``tree``, in a process of its own."""
    out = subprocess.run(
        [sys.executable, "-c", _ROUNDS, str(rounds), str(STREAMS), str(PROMPT_LEN), str(NEW_TOKENS)],
        cwd=tree,
        env={**_clean_env(), "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("FIGURES "))
    return json.loads(line.removeprefix("FIGURES "))


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DTYPE", "QUANTIZE")}


def side_by_side(rounds: int = 3) -> dict[str, dict[str, float]]:
    """This tree's engine and the BASELINE commit's, measured one after the other."""
    with tempfile.TemporaryDirectory() as scratch:
        worktree = Path(scratch) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), BASELINE], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        try:
            before = engine_in(worktree, rounds)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    return {"before": before, "after": engine_in(ROOT, rounds)}


def run(rounds: int = 3) -> dict[str, object]:
    source = resolve_model(None)
    dtype = choose_dtype(None, torch.device("cpu"))
    generate = statistics.median(generate_rate(source, dtype, PROMPT_LEN, NEW_TOKENS) for _ in range(rounds))
    return {"cpu": cpu_name(), "generate_1": generate, **side_by_side(rounds)}


def report(m: dict) -> str:
    before, after, g = m["before"], m["after"], m["generate_1"]
    rows = [
        ("decode, 1 sequence", "decode_1", "tok/s", "floor 90% of before; issue 7: 3x generate"),
        ("decode, 16 sequences", "decode_16", "tok/s", ""),
        ("decode, 64 sequences", "decode_64", "tok/s", "floor 95% of before; issue 7: 25x generate"),
        ("prefill, 512-token prompt", "prefill_512", "tok/s", "floor 2,000 tok/s"),
    ]
    lines = [
        f"engine, one numerical path vs before ({BASELINE[:7]}), SmolLM2-135M as served by default "
        f"({after['dtype']}), medians of 3 rounds, same run, on {m['cpu']}:",
        f"  transformers generate, 1 request: {g:8.1f} tok/s",
        f"  {'':28s} {'before':>9s} {'now':>9s} {'now/before':>10s} {'now/generate':>12s}",
    ]
    for label, key, unit, note in rows:
        lines.append(
            f"  {label:28s} {before[key]:9.1f} {after[key]:9.1f} {after[key] / before[key]:9.0%} "
            f"{after[key] / g:11.1f}x  {unit}  {note}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(run()))
