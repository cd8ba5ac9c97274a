"""Limits the router derives when the environment leaves them unset."""

from __future__ import annotations

from router.config import CPU_PREFILL_BUDGET, Limits, parse_config


def test_prompt_budget_is_a_bounded_chunk_on_cpu_and_a_whole_prompt_on_gpu():
    config = parse_config([], {})
    assert Limits.resolve(config, 8192, "cpu").max_batch_prefill_tokens == CPU_PREFILL_BUDGET
    assert Limits.resolve(config, 8192, "cuda:0").max_batch_prefill_tokens == 8191
    explicit = parse_config([], {"MAX_BATCH_PREFILL_TOKENS": "4096"})
    assert Limits.resolve(explicit, 8192, "cpu").max_batch_prefill_tokens == 4096
