"""Speculative decoding with a draft model (SPECULATIVE_METHOD=draft) through the stack, one
stream, against the same model without speculation, in one run (issue 34's draft targets).

Three drafts, each beside its own reference stack, on the grounded workload (256 tokens) and
the shared workload (medium prompts, 128 tokens):

- the default model as its own draft: every greedy guess holds, so this measures what the
  machinery costs. It cannot reach 1.0x: k guesses take k draft steps as dear as the model's
  own, plus the verification (docs/performance.md, "Draft models");
- a tiny random model with the same vocabulary: its guesses almost all fail, and speculation
  must step aside (target >= 0.9x);
- the default model's 4-bit file drafting for the same model served unquantized
  (QUANTIZE=none): the draft a user would pick, far cheaper than the model and nearly always
  right.

Each drafted stack's grounded answers are compared with its reference's, text for text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.engine import cpu_name
from benchmarks.served import Figures, loadgen, serving, switchyard_argv
from benchmarks.speculation import SPECULATE, _counter
from common.disk_cache import cache_root
from common.model_source import default_model_dir, resolve_model
from common.ports import free_port
from support.tiny_models import build_tiny_model

REQUESTS = 4


@dataclass
class Run:
    grounded: Figures
    shared: Figures
    texts: list[str] = field(default_factory=list)
    drafted: float = 0.0
    accepted: float = 0.0


def _tiny_draft() -> Path:
    """A random tiny Qwen2 with SmolLM2's tokenizer (the default model's vocabulary), built once."""
    folder = cache_root() / "bench" / "tiny-qwen2-draft"
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_tiny_model("qwen2", folder)
    return folder


def _default_gguf() -> str:
    source = resolve_model(None)
    return str(default_model_dir() / (source.gguf_file or ""))


def _measure(name: str, env: dict[str, str], seed: int) -> Run:
    port = free_port()
    with serving(f"switchyard-{name}", switchyard_argv(port), port, env) as url:
        texts: list[str] = []
        grounded = loadgen(url, 1, seed, "grounded", 256, REQUESTS, texts)
        shared = loadgen(url, 1, seed + 1, "medium", 128, REQUESTS)
        return Run(grounded, shared, texts, _counter(url, "vllm:spec_decode_num_draft_tokens_total"),
                   _counter(url, "vllm:spec_decode_num_accepted_tokens_total"))  # fmt: skip


def run(seed: int = 5000) -> dict[str, tuple[Run, Run]]:
    """Each draft's (reference, drafted) stacks, one after the other, on the same prompts."""
    off = {"SPECULATE": "0"}
    drafting = {"SPECULATE": str(SPECULATE), "SPECULATIVE_METHOD": "draft"}
    unquantized = {"QUANTIZE": "none"}
    reference = _measure("plain", off, seed)
    return {
        "the model itself": (reference, _measure("self-draft", {**drafting, "DRAFT_MODEL_ID": _default_gguf()}, seed)),
        "a tiny random model": (
            reference,
            _measure("tiny-draft", {**drafting, "DRAFT_MODEL_ID": str(_tiny_draft())}, seed),
        ),
        "its 4-bit file, for the model unquantized": (
            _measure("unquantized", {**off, **unquantized}, seed),
            _measure("4bit-draft", {**drafting, **unquantized, "DRAFT_MODEL_ID": _default_gguf()}, seed),
        ),
    }


def report(results: dict[str, tuple[Run, Run]], cpu: str) -> str:
    lines = [f"speculative decoding with a draft model (SPECULATE={SPECULATE}), one stream, on {cpu}:"]
    for draft, (off, on) in results.items():
        same = sum(a == b for a, b in zip(off.texts, on.texts, strict=True))
        rate = on.accepted / on.drafted if on.drafted else 0.0
        lines.append(
            f"  draft = {draft}: grounded {on.grounded.tokens_per_s:.1f} against {off.grounded.tokens_per_s:.1f} "
            f"tok/s = {on.grounded.tokens_per_s / off.grounded.tokens_per_s:.2f}x; shared workload "
            f"{on.shared.tokens_per_s:.1f} against {off.shared.tokens_per_s:.1f} tok/s = "
            f"{on.shared.tokens_per_s / off.shared.tokens_per_s:.2f}x; {on.accepted:.0f} of {on.drafted:.0f} "
            f"guesses kept ({rate:.0%}); identical text in {same} of {len(off.texts)} answers"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(run(), cpu_name()), flush=True)
