"""Shard configuration: flags, with TGI's environment names as fallback."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.settings import env_float, env_int, env_option, env_str
from common.tracing import add_tracing_args


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
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    #: Attention: "auto" (the C kernel on CPU where it builds), "sdpa" or "cpu-paged".
    attention_backend: str = "auto"
    #: "auto": a 4-bit checkpoint's linears stored as their 4-bit values (not in float32); "int4", "none".
    quantize: str = "auto"
    #: torch compute threads (0: torch's default, one per core).
    threads: int = 0
    #: Save the prepared model under SWITCHYARD_CACHE and map it on later starts (shard.prepared_model).
    prepared_cache: bool = True
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
    """The shard's settings: flags whose defaults come from the environment names in their help."""
    p = argparse.ArgumentParser(prog="python -m shard", description="Serve one model shard over gRPC.")
    _add_placement_args(p, env)
    _add_engine_args(p, env)
    add_tracing_args(p, env, "switchyard-shard")
    return p


def parse_config(argv: Sequence[str] | None, env: Mapping[str, str]) -> ShardConfig:
    p = build_parser(env)
    a = p.parse_args(argv)
    if a.threads < 0:
        p.error("--threads must be >= 0")
    if a.block_size < 1 or not 0 < a.kv_cache_fraction <= 1:
        p.error("--block-size must be >= 1 and --kv-cache-fraction in (0, 1]")
    # Every flag's dest is a ShardConfig field of the same name.
    return ShardConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(ShardConfig)})


def _add_placement_args(p: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """Which model, on which device, as which rank, reachable where."""
    env_option(p, env, "--model-id", "MODEL_ID", help="folder, .gguf file or hub id")
    env_option(p, env, "--dtype", "DTYPE", help="float32, bfloat16 or float16")
    env_option(p, env, "--device", "DEVICE", default="auto", help="cpu, cuda or auto")
    env_option(p, env, "--rank", "RANK", kind=int, default=0)
    env_option(p, env, "--world-size", "WORLD_SIZE", "NUM_SHARD", kind=int, default=1)
    env_option(p, env, "--uds-path", "SHARD_UDS_PATH", default="/tmp/switchyard-shard")
    env_option(p, env, "--listen", "SHARD_LISTEN", help="TCP host:port instead of a socket")
    env_option(p, env, "--advertise-host", "SHARD_ADVERTISE_HOST")
    env_option(p, env, "--master-addr", "MASTER_ADDR", default="127.0.0.1")
    env_option(p, env, "--master-port", "MASTER_PORT", kind=int, default=29500)


def _add_engine_args(p: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """KV cache shape and the speed switches (see README, "CPU performance")."""
    p.add_argument("--block-size", type=int, default=env_int(env, "BLOCK_SIZE", default=16), help="[BLOCK_SIZE]")
    p.add_argument(
        "--kv-cache-fraction",
        type=float,
        default=env_float(env, "KV_CACHE_FRACTION", default=0.25),
        help="share of free memory for the KV cache when the router does not fix its size [KV_CACHE_FRACTION]",
    )
    p.add_argument(
        "--attention-backend",
        choices=("auto", "sdpa", "cpu-paged"),
        default=env_str(env, "ATTENTION_BACKEND", default="auto"),
        help="attention: the C kernel on CPU (auto) or gathered SDPA [ATTENTION_BACKEND]",
    )
    p.add_argument(
        "--quantize",
        choices=("auto", "int4", "none"),
        default=env_str(env, "QUANTIZE", default="auto"),
        help="4-bit weight storage: auto (4-bit checkpoints, not in float32), int4 (any), none [QUANTIZE]",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=env_int(env, "SHARD_THREADS", default=0),
        help="CPU compute threads; 0: one per core (the launcher divides the cores among its shards) [SHARD_THREADS]",
    )
    p.add_argument(
        "--prepared-cache",
        action=argparse.BooleanOptionalAction,
        default=env_str(env, "PREPARED_MODEL_CACHE", default="1") not in {"0", "false", "no"},
        help="keep the prepared model under SWITCHYARD_CACHE for fast restarts [PREPARED_MODEL_CACHE=1|0]",
    )
