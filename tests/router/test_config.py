"""Limits the router derives when the environment leaves them unset."""

from __future__ import annotations

from router.config import CPU_PREFILL_BUDGET, Limits, parse_config


def test_prompt_budget_is_a_bounded_chunk_on_cpu_and_a_whole_prompt_on_gpu():
    config = parse_config([], {})
    assert Limits.resolve(config, 8192, "cpu").max_batch_prefill_tokens == CPU_PREFILL_BUDGET
    assert Limits.resolve(config, 8192, "cuda:0").max_batch_prefill_tokens == 8191
    explicit = parse_config([], {"MAX_BATCH_PREFILL_TOKENS": "4096"})
    assert Limits.resolve(explicit, 8192, "cpu").max_batch_prefill_tokens == 4096


def test_arrivals_join_at_the_next_step_on_cpu_and_wait_as_tgi_on_gpu():
    """Unset: a CPU shard takes arrivals at once (its steps carry bounded prompt chunks next to
    the decode tokens); a GPU one keeps TGI's 1.2 and 20. Set, either value is kept as given."""
    config = parse_config([], {})
    cpu, gpu = Limits.resolve(config, 8192, "cpu"), Limits.resolve(config, 8192, "cuda:0")
    assert (cpu.waiting_served_ratio, cpu.max_waiting_tokens) == (0.0, 0)
    assert (gpu.waiting_served_ratio, gpu.max_waiting_tokens) == (1.2, 20)
    explicit = parse_config(["--max-waiting-tokens", "5"], {"WAITING_SERVED_RATIO": "0.5"})
    assert (Limits.resolve(explicit, 8192, "cpu").waiting_served_ratio, explicit.max_waiting_tokens) == (0.5, 5)
    assert Limits.resolve(explicit, 8192, "cuda:0").max_waiting_tokens == 5
