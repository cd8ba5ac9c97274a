"""Router configuration: flags, with TGI's environment names as fallback.

Limits left unset here are derived from what the shards report (the model's
context length, the KV blocks allocated at Warmup) by ``Limits.resolve``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.settings import ROUTER, config_from, parser_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    """The router's settings (``common.settings.SETTINGS``, each field the setting of its name)."""

    model_id: str | None
    listen: str
    shard_uds_path: str
    shard_address: str | None
    max_input_tokens: int | None
    max_total_tokens: int | None
    max_batch_prefill_tokens: int | None
    max_batch_total_tokens: int | None
    max_batch_size: int
    max_concurrent_requests: int
    max_stop_sequences: int
    max_top_n_tokens: int
    waiting_served_ratio: float | None
    max_waiting_tokens: int | None
    otlp_endpoint: str | None
    otlp_service_name: str
    #: Seconds a request waits for a restarted shard before it fails.
    shard_recovery_timeout: float
    #: Bearer key every public call but Health must carry; None = open.
    api_key: str | None
    #: How the model writes tool calls: "auto" (from its chat template) or a router.tools format.
    tool_call_format: str
    #: Rank 0 of each model replica (SHARD_ADDRESSES), when there are several.
    shard_addresses: tuple[str, ...]
    #: How much busier (share of KV capacity) the replica with the longest cached prefix may be.
    placement_load_margin: float
    #: cache_aware, least_loaded or round_robin (router.replicas).
    placement_policy: str
    #: Seconds the start waits for the other replicas once one is up.
    replica_start_wait: float
    #: Send decode step N+1 before step N's answer is in (router.step_pipeline).
    pipeline_steps: bool
    #: fcfs or priority (router.planner).
    scheduling_policy: str
    #: How a reasoning model's thinking is told from its answer: auto, none or a router.reasoning format.
    reasoning_parser: str
    #: Embeddings' pooling when the model does not say (router.embeddings).
    pooling: str
    #: Speculative decoding (router.speculation): guesses per step (0: off), how, within how many rows.
    speculate: int
    speculative_method: str
    speculation_step_rows: int
    #: LORA_ADAPTERS as given (router.adapters.parse_adapters).
    lora_adapters: str | None = None

    @property
    def shard_entries(self) -> list[str]:
        """Rank 0 of each replica (rank 0 lists the others of its group)."""
        if self.shard_addresses:
            return list(self.shard_addresses)
        return [self.shard_address or f"unix://{self.shard_uds_path}-0"]


@dataclass(frozen=True)
class Limits:
    """Token limits in force, after defaults are filled from the shards."""

    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_size: int
    #: New arrivals join a running batch once at least ``ratio * batch size`` of
    #: them wait (TGI's WAITING_SERVED_RATIO) ...
    waiting_served_ratio: float = 0.0
    #: ... or once this many decode steps ran without them (MAX_WAITING_TOKENS).
    max_waiting_tokens: int = 0
    #: Serve by request priority rather than arrival (SCHEDULING_POLICY=priority).
    by_priority: bool = False

    @classmethod
    def resolve(cls, config: RouterConfig, max_positions: int, device: str = "cpu") -> Limits:
        total = config.max_total_tokens or max_positions
        if total > max_positions:
            # A TGI env block written for a longer-context model still starts.
            log.warning(
                "MAX_TOTAL_TOKENS=%d exceeds the model's %d positions: using %d", total, max_positions, max_positions
            )
            total = max_positions
        inputs = min(config.max_input_tokens or total - 1, total - 1)
        if config.max_input_tokens and config.max_input_tokens >= total:
            log.warning("MAX_INPUT_TOKENS=%d must be below %d: using %d", config.max_input_tokens, total, inputs)
        prefill = config.max_batch_prefill_tokens or default_prefill_budget(inputs, device)
        ratio, steps = default_admission(device)
        if config.waiting_served_ratio is not None:
            ratio = config.waiting_served_ratio
        if config.max_waiting_tokens is not None:
            steps = config.max_waiting_tokens
        by_priority = config.scheduling_policy == "priority"
        return cls(inputs, total, prefill, config.max_batch_size, ratio, steps, by_priority)


#: Prompt tokens per step on a CPU shard: every step carries the decode tokens of the
#: running streams, which a bounded chunk holds back far less than TGI's whole-prompt
#: default; smaller chunks also serve a burst of arrivals first come, first served (the
#: first prompt's first token comes after its own chunk, not after everyone's). The
#: measurements: docs/performance.md, "Prompt chunks on CPU".
CPU_PREFILL_BUDGET = 512


def default_prefill_budget(max_input_tokens: int, device: str) -> int:
    """MAX_BATCH_PREFILL_TOKENS when unset: a bounded chunk on CPU, a whole prompt on GPU (as TGI)."""
    if device.startswith("cpu"):
        return CPU_PREFILL_BUDGET
    return max(max_input_tokens, 4096)


def default_admission(device: str) -> tuple[float, int]:
    """(WAITING_SERVED_RATIO, MAX_WAITING_TOKENS) when unset.

    Every step carries the running streams' decode tokens and the prompt chunks together, and
    on CPU the chunks are bounded (CPU_PREFILL_BUDGET): holding arrivals back (TGI's 1.2 and 20)
    then only leaves their slots empty for ~20 steps of each request's life (docs/performance.md,
    "Admission on CPU"), for no saving, since their prompts cost the same later. So a CPU shard takes
    arrivals at the next step, as vLLM's chunked prefill does. On GPU, where a step takes whole
    prompts (4,096+ tokens) and running streams stall for them, TGI's policy stays.
    """
    if device.startswith("cpu"):
        return 0.0, 0
    return 1.2, 20


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The router's settings (common.settings.SETTINGS), defaults read from ``env``."""
    return parser_for(ROUTER, env, "Batch requests onto the model shards.")


def parse_config(argv: Sequence[str] | None, env: Mapping[str, str]) -> RouterConfig:
    p = build_parser(env)
    a = p.parse_args(argv)
    for name in ("max_batch_size", "max_concurrent_requests"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    addresses = tuple(x.strip() for x in (a.shard_addresses or "").split(",") if x.strip())
    return config_from(RouterConfig, a, shard_addresses=addresses)
