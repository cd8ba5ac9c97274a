"""Shard configuration: flags, with TGI's environment names as fallback."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.settings import SHARD, config_from, default_of, parser_for


@dataclass(frozen=True)
class ShardConfig:
    model_id: str | None
    dtype: str | None
    device: str
    rank: int
    world_size: int
    #: Unix socket prefix; rank r listens on f"{uds_path}-{r}" unless ``listen`` is set.
    uds_path: str
    #: TCP "host:port" to listen on instead of a Unix socket.
    listen: str | None
    block_size: int
    #: Fraction of free memory (after the weights) the KV cache may take.
    kv_cache_fraction: float
    #: Host other services reach this shard at, when listening on TCP (e.g. its compose service name).
    advertise_host: str | None = None
    #: Where rank 0 listens for torch.distributed's rendezvous (tensor parallelism).
    master_addr: str = default_of(SHARD, "master_addr")
    master_port: int = default_of(SHARD, "master_port")
    #: Attention: "auto" (the C kernel on CPU where it builds), "sdpa" or "cpu-paged".
    attention_backend: str = default_of(SHARD, "attention_backend")
    #: "auto": a 4-bit checkpoint's linears stored as their 4-bit values (not in float32); "int4", "none".
    quantize: str = default_of(SHARD, "quantize")
    #: 4-/5-/6-bit layers multiply in int8 on quantized inputs (shard.numerics.invariant_linear.quantize_activations).
    quantized_activations: bool = default_of(SHARD, "quantized_activations")
    #: torch compute threads (0: torch's default, one per core).
    threads: int = default_of(SHARD, "threads")
    #: Fault the KV cache's memory in on an idle-priority thread after warmup (PagedKVCache.make_resident).
    kv_prefault: bool = default_of(SHARD, "kv_prefault")
    #: Seconds of warmup spent mapping the cache's lowest blocks before the shard reports ready.
    kv_prefault_ready_s: float = default_of(SHARD, "kv_prefault_ready_s")
    #: Save the prepared model under SWITCHYARD_CACHE and map it on later starts (shard.loading.prepared_model).
    prepared_cache: bool = default_of(SHARD, "prepared_cache")
    #: A smaller model with the same vocabulary that makes speculative guesses (shard.runtime.drafter).
    draft_model_id: str | None = None
    otlp_endpoint: str | None = None
    otlp_service_name: str = "switchyard-shard"

    @property
    def address(self) -> str:
        return self.listen or f"unix://{self.uds_path}-{self.rank}"

    def address_of(self, rank: int) -> str:
        if self.listen:
            host, port = self.listen.rsplit(":", 1)
            return f"{self.advertise_host or host}:{int(port) + rank - self.rank}"
        return f"unix://{self.uds_path}-{rank}"


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The shard's settings (common.settings.SETTINGS), defaults read from ``env``."""
    return parser_for(SHARD, env, "Serve one model shard over gRPC.")


def parse_config(argv: Sequence[str] | None, env: Mapping[str, str]) -> ShardConfig:
    p = build_parser(env)
    a = p.parse_args(argv)
    if a.threads < 0:
        p.error("--threads must be >= 0")
    if a.block_size < 1 or not 0 < a.kv_cache_fraction <= 1:
        p.error("--block-size must be >= 1 and --kv-cache-fraction in (0, 1]")
    return config_from(ShardConfig, a)
