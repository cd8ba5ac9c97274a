"""Speculative decoding (SPECULATE) through the stack, on the default model, against the same
stack without it, in one run: the grounded workload (answers that copy their notes; 256 tokens)
at one stream, where n-gram guesses pay, and the shared workload at 1, 16 and 64 streams, where
they must not cost (issue 34's targets: >= 2.0x and >= 0.97x). The grounded answers of both
stacks are compared text for text: speculation may change speed only."""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass, field

from benchmarks.served import PLAN, Figures, loadgen, serving, switchyard_argv
from common.ports import free_port

#: Guesses per step in the measured configuration: 3, so that a verifying sequence's step holds
#: 4 rows, which the CPU kernels compute at about the cost of one; a fifth row costs a tile of
#: its own (docs/performance.md, "Speculative decoding").
SPECULATE = 3
GROUNDED_REQUESTS = 4


@dataclass
class Side:
    grounded: Figures
    shared: dict[int, Figures]
    texts: list[str] = field(default_factory=list)
    drafted: float = 0.0
    accepted: float = 0.0


def _counter(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M))


def _side(speculate: int, seed: int) -> Side:
    port = free_port()
    env = {"SPECULATE": str(speculate)}
    with serving(f"switchyard-speculate-{speculate}", switchyard_argv(port), port, env) as url:
        texts: list[str] = []
        grounded = loadgen(url, 1, seed, "grounded", 256, GROUNDED_REQUESTS, texts)
        side = Side(grounded, {}, texts)
        side.drafted = _counter(url, "vllm:spec_decode_num_draft_tokens_total")
        side.accepted = _counter(url, "vllm:spec_decode_num_accepted_tokens_total")
        side.shared = {c: loadgen(url, c, seed + 1 + i) for i, c in enumerate(PLAN)}
    return side


def run(seed: int = 3000) -> dict[str, Side]:
    """Both stacks on the same prompts (same seeds), one after the other."""
    return {"off": _side(0, seed), "on": _side(SPECULATE, seed)}


def report(sides: dict[str, Side], cpu: str) -> str:
    off, on = sides["off"], sides["on"]
    same = sum(a == b for a, b in zip(off.texts, on.texts, strict=True))
    rate = on.accepted / on.drafted if on.drafted else 0.0
    gain = on.grounded.tokens_per_s / off.grounded.tokens_per_s
    lines = [
        f"speculative decoding (SPECULATE={SPECULATE}, ngram) through the stack, default model, on {cpu}:",
        f"  grounded, 1 stream, 256 tokens: {on.grounded.tokens_per_s:.1f} tok/s against "
        f"{off.grounded.tokens_per_s:.1f} off = {gain:.2f}x (target >= 2.0x); ITL p50 "
        f"{on.grounded.itl_p50_ms:.1f} against {off.grounded.itl_p50_ms:.1f} ms; {on.accepted:.0f} of "
        f"{on.drafted:.0f} guesses kept ({rate:.0%}); identical text in {same} of {len(off.texts)} answers",
    ]
    for streams, plain in off.shared.items():
        guessed = on.shared[streams]
        lines.append(
            f"  shared workload, {streams} streams: {guessed.tokens_per_s:.1f} tok/s against {plain.tokens_per_s:.1f} "
            f"off = {guessed.tokens_per_s / plain.tokens_per_s:.2f}x (target >= 0.97x)"
        )
    return "\n".join(lines)
