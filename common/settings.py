"""Every setting of every service, in one table, read from flags and the environment.

``SETTINGS`` is the one place a setting is declared: its flag, the environment
names that set it (TGI's, so that a TGI deployment's env block works
unchanged), its type and default, which services read it, and what it means.
Each service builds its argument parser from the rows it reads
(``parser_for``), ``python -m launcher --help`` prints the whole table, and the
tests check the README's table and docker-compose.yml against it. Nothing reads
the environment at import time: a process reads it once when it starts
(``process_env``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")

SHARD, ROUTER, FACADE, LAUNCHER = "shard", "router", "facade", "launcher"
SERVICES = (SHARD, ROUTER, FACADE, LAUNCHER)


@dataclass(frozen=True)
class Setting:
    flag: str
    #: Environment names, first set wins (aliases after the main name).
    env: tuple[str, ...]
    services: tuple[str, ...]
    help: str = ""
    kind: type = str
    default: Any = None
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _s(flag: str, env: str | tuple[str, ...], services: str | tuple[str, ...], help: str = "", **kw: Any) -> Setting:
    envs = (env,) if isinstance(env, str) else env
    return Setting(flag, envs, (services,) if isinstance(services, str) else services, help, **kw)


SETTINGS: tuple[Setting, ...] = (
    # --- what is served, where the services listen ------------------------------------
    _s("--model-id", "MODEL_ID", (SHARD, ROUTER, LAUNCHER),
       "folder, .gguf file or hub id; default: SmolLM2-135M-Instruct"),
    _s("--hostname", "HOSTNAME", (FACADE, LAUNCHER), "HTTP address", default="0.0.0.0"),
    _s("--port", "PORT", (FACADE, LAUNCHER), "HTTP port", kind=int, default=8080),
    _s("--num-shard", "NUM_SHARD", LAUNCHER, "shards (ranks) of each model replica", kind=int, default=1),
    _s("--num-replicas", "NUM_REPLICAS", LAUNCHER, "model replicas behind the router (make serve)", kind=int,
       default=1),
    _s("--ready-timeout", "READY_TIMEOUT", LAUNCHER, "seconds to wait for /health", kind=float, default=900.0),
    _s("--shard-listen", "SHARD_LISTEN", LAUNCHER, "shards role: rank r listens on this port + r",
       default="0.0.0.0:50060"),
    _s("--listen", "SHARD_LISTEN", SHARD, "TCP host:port instead of a Unix socket"),
    _s("--uds-path", "SHARD_UDS_PATH", SHARD, "Unix socket prefix (rank appended)", default="/tmp/switchyard-shard"),
    _s("--advertise-host", "SHARD_ADVERTISE_HOST", SHARD, "host the other ranks and the router reach this rank at"),
    _s("--rank", "RANK", SHARD, kind=int, default=0),
    _s("--world-size", ("WORLD_SIZE", "NUM_SHARD"), SHARD, "ranks of the replica", kind=int, default=1),
    _s("--master-addr", "MASTER_ADDR", SHARD, "tensor-parallel rendezvous host", default="127.0.0.1"),
    _s("--master-port", "MASTER_PORT", SHARD, "tensor-parallel rendezvous port", kind=int, default=29500),
    _s("--listen", "ROUTER_LISTEN", ROUTER, "public gRPC address, host:port or unix:///path; loopback unless set",
       default="127.0.0.1:50051"),
    _s("--shard-uds-path", "SHARD_UDS_PATH", ROUTER, "the shards' Unix socket prefix", default="/tmp/switchyard-shard"),
    _s("--shard-address", "SHARD_ADDRESS", ROUTER, "rank 0 over TCP, host:port"),
    _s("--shard-addresses", "SHARD_ADDRESSES", ROUTER,
       "several model replicas: rank 0 of each, comma-separated (host:port or unix:///path)"),
    _s("--replica-start-wait", "REPLICA_START_WAIT", ROUTER,
       "seconds the start waits for the other replicas once one is up (later ones join at run time)",
       kind=float, default=60.0),
    _s("--placement-policy", "PLACEMENT_POLICY", ROUTER, "how requests are spread over replicas",
       default="cache_aware", choices=("cache_aware", "least_loaded", "round_robin")),
    _s("--placement-load-margin", "PLACEMENT_LOAD_MARGIN", ROUTER,
       "a request goes to the replica caching most of its prompt unless that one is busier than the least "
       "loaded by more than this share of KV capacity", kind=float, default=0.1),
    _s("--router", "ROUTER_ADDRESS", FACADE, "the router's public gRPC address", default="127.0.0.1:50051"),
    # --- the model on its device ------------------------------------------------------
    _s("--dtype", "DTYPE", SHARD, "float32, bfloat16 or float16"),
    _s("--device", "DEVICE", SHARD, "cpu, cuda or auto", default="auto"),
    _s("--block-size", "BLOCK_SIZE", SHARD, "KV cache block, tokens", kind=int, default=16),
    _s("--kv-cache-fraction", "KV_CACHE_FRACTION", SHARD,
       "share of free memory for the KV cache when the router does not fix its size", kind=float, default=0.25),
    _s("--attention-backend", "ATTENTION_BACKEND", SHARD, "attention: the C kernel on CPU (auto) or gathered SDPA",
       default="auto", choices=("auto", "sdpa", "cpu-paged")),
    _s("--quantize", "QUANTIZE", SHARD,
       "quantized weight storage: auto (a GGUF file's own blocks, Q4_0 ... Q6_K; another checkpoint's "
       "exact 4-bit grid), int4 (also quantizes the rest, lossy), none (de-quantized to DTYPE)",
       default="auto", choices=("auto", "int4", "none")),
    _s("--quantized-activations", "QUANTIZED_ACTIVATIONS", SHARD,
       "4-, 5- and 6-bit layers (GGUF Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) multiply in int8 on each row's input "
       "quantized in blocks of 32 (llama.cpp's way): faster, still step-invariant, no longer the float "
       "model's exact arithmetic (docs/performance.md, \"int8 activations\")", kind=bool, default=False),
    _s("--threads", "SHARD_THREADS", SHARD,
       "CPU compute threads; 0: one per core (the launcher divides the cores among its shards)", kind=int, default=0),
    _s("--kv-prefault", "KV_PREFAULT", SHARD,
       "map the KV cache's memory in the background at idle priority after warmup, not at first use",
       kind=bool, default=True),
    _s("--kv-prefault-ready-s", "KV_PREFAULT_READY_S", SHARD,
       "with KV_PREFAULT, seconds of warmup that map the KV cache's first blocks before the shard is ready "
       "(the rest in the background)", kind=float, default=10.0),
    _s("--prepared-cache", "PREPARED_MODEL_CACHE", SHARD,
       "keep the prepared model under SWITCHYARD_CACHE for fast restarts", kind=bool, default=True),
    # --- limits and batching (router) -------------------------------------------------
    _s("--max-input-tokens", ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), ROUTER, "longest prompt", kind=int),
    _s("--max-total-tokens", "MAX_TOTAL_TOKENS", ROUTER, "longest prompt + output", kind=int),
    _s("--max-concurrent-requests", "MAX_CONCURRENT_REQUESTS", ROUTER,
       "requests in flight before new ones are refused (HTTP 429)", kind=int, default=128),
    _s("--max-stop-sequences", "MAX_STOP_SEQUENCES", ROUTER, kind=int, default=4),
    _s("--max-top-n-tokens", "MAX_TOP_N_TOKENS", ROUTER, kind=int, default=20),
    _s("--max-batch-prefill-tokens", "MAX_BATCH_PREFILL_TOKENS", ROUTER, "prompt tokens per step", kind=int),
    _s("--max-batch-total-tokens", "MAX_BATCH_TOTAL_TOKENS", ROUTER, "KV cache size, tokens", kind=int),
    _s("--max-batch-size", "MAX_BATCH_SIZE", ROUTER, "sequences per step", kind=int, default=128),
    _s("--waiting-served-ratio", "WAITING_SERVED_RATIO", ROUTER,
       "arrivals join a running batch once this many times its size wait; default: 0 on CPU, 1.2 on GPU",
       kind=float),
    _s("--max-waiting-tokens", "MAX_WAITING_TOKENS", ROUTER,
       "...or once this many decode steps ran without them; default: 0 on CPU, 20 on GPU", kind=int),
    _s("--scheduling-policy", "SCHEDULING_POLICY", ROUTER,
       "fcfs: first come, first served; priority: by each request's priority (lower sooner), a waiting "
       "request preempting running ones of a higher value when KV blocks are short",
       default="fcfs", choices=("fcfs", "priority")),
    _s("--shard-recovery-timeout", "SHARD_RECOVERY_TIMEOUT", ROUTER,
       "seconds a request waits for a restarted shard before it fails", kind=float, default=60.0),
    _s("--pipeline-steps", "PIPELINE_STEPS", ROUTER,
       "send a decode step before the previous one's answer is in (hides the round trip)", kind=bool, default=True),
    _s("--lora-adapters", "LORA_ADAPTERS", ROUTER,
       "LoRA adapters served beside the model: name=path,name2=path2 (PEFT folders; a bare path takes the "
       "folder's name); clients pick one with model=\"<name>\" or TGI's adapter_id"),
    _s("--speculate", "SPECULATE", ROUTER,
       "speculative decoding: tokens guessed per step and request, verified by the model so that the output "
       "is unchanged (0: off; docs/performance.md, \"Speculative decoding\")", kind=int, default=3),
    _s("--speculative-method", "SPECULATIVE_METHOD", ROUTER,
       "how guesses are made: ngram (prompt lookup: what followed the last tokens earlier in the prompt or output)"
       "; draft: a smaller model with the same tokenizer (DRAFT_MODEL_ID) continues each request greedily",
       default="ngram", choices=("ngram", "draft")),
    _s("--draft-model-id", "DRAFT_MODEL_ID", SHARD,
       "the draft model of SPECULATIVE_METHOD=draft: folder, .gguf file or hub id, with the served model's "
       "vocabulary; a quantized file keeps its blocks (QUANTIZE=auto) whatever QUANTIZE says for the model"),
    _s("--speculation-step-rows", "SPECULATION_STEP_ROWS", ROUTER,
       "most decode rows (pending tokens and guesses) a step with guesses carries: what the CPU kernels "
       "compute at about the cost of one row; a larger batch makes no guesses", kind=int, default=4),
    _s("--tool-call-format", "TOOL_CALL_FORMAT", ROUTER,
       "how the model writes tool calls; auto: from its chat template",
       default="auto", choices=("auto", "hermes", "llama3_json", "mistral")),
    _s("--reasoning-parser", "REASONING_PARSER", ROUTER,
       "how a reasoning model's thinking is returned apart from its answer (reasoning_content); auto: when "
       "the chat template writes think tags", default="auto", choices=("auto", "none", "deepseek_r1", "qwen3",
                                                                      "smollm3")),
    _s("--pooling", "POOLING", ROUTER,
       "how /v1/embeddings pools the final hidden states when the model has no sentence-transformers config",
       default="last", choices=("last", "mean", "cls")),
    # --- the HTTP API (facade) ----------------------------------------------------------
    _s("--api-key", "API_KEY", (ROUTER, FACADE), "bearer key of the HTTP API and the router's gRPC API"),
    _s("--payload-limit", "PAYLOAD_LIMIT", FACADE, "largest body, bytes", kind=int, default=2_000_000),
    _s("--cors-allow-origin", "CORS_ALLOW_ORIGIN", FACADE, "comma-separated origins, or *", default=""),
    _s("--metrics-api-key", "METRICS_API_KEY", FACADE, "a key that opens /metrics only"),
    _s("--metrics-port", "METRICS_PORT", FACADE, "a key-less listener serving /metrics only", kind=int),
    _s("--responses-store-size", "RESPONSES_STORE_SIZE", FACADE, "responses kept for previous_response_id",
       kind=int, default=1000),
    # --- tracing ------------------------------------------------------------------------
    _s("--otlp-endpoint", "OTLP_ENDPOINT", (SHARD, ROUTER, FACADE), "OTLP/gRPC collector"),
    _s("--otlp-service-name", "OTLP_SERVICE_NAME", (SHARD, ROUTER, FACADE), "default: switchyard-<service>"),
)  # fmt: skip

#: Read from the environment only, by every service (no flag).
ENVIRONMENT_ONLY: tuple[tuple[str, str], ...] = (
    ("SWITCHYARD_CACHE", "kernels, prepared models, converted tokenizers (default ~/.cache/switchyard)"),
    ("GRPC_TLS_CERT | GRPC_TLS_KEY | GRPC_TLS_CA | GRPC_TLS_SERVER_NAME", "TLS between the services"),
)


def default_of(service: str, dest: str) -> Any:
    """The default of the ``service``'s setting ``dest`` (a config field's name): config
    dataclasses take their defaults from here rather than write them again."""
    return next(s.default for s in settings_of(service) if s.dest == dest)


def config_from(config_type: type[ConfigT], args: argparse.Namespace, **derived: Any) -> ConfigT:
    """A service's config dataclass from its parsed settings: each field is the setting of the
    same name, except those ``derived`` from them (parsed lists, TLS files)."""
    names = [f.name for f in dataclasses.fields(config_type)]  # type: ignore[arg-type]
    values = {name: getattr(args, name) for name in names if name not in derived}
    return config_type(**values, **derived)


def settings_of(service: str) -> Iterable[Setting]:
    return (s for s in SETTINGS if service in s.services)


def parser_for(service: str, env: Mapping[str, str], description: str) -> argparse.ArgumentParser:
    """The ``service``'s flags, their defaults read from ``env``; each help ends with its variables."""
    p = argparse.ArgumentParser(prog=f"python -m {service}", description=description)
    for s in settings_of(service):
        default = s.default if s.dest != "otlp_service_name" else f"switchyard-{service}"
        extra: dict[str, Any] = {"choices": s.choices} if s.choices else {}
        if s.kind is bool:
            extra["action"] = argparse.BooleanOptionalAction
        elif s.kind is not str:
            extra["type"] = s.kind
        help_text = f"{s.help} [{' | '.join(s.env)}]".lstrip()
        p.add_argument(s.flag, default=read(env, s, default), help=help_text, **extra)
    return p


def read(env: Mapping[str, str], setting: Setting, default: Any = None) -> Any:
    """The setting's value from the first of its environment names that is set, else ``default``."""
    value = env_str(env, *setting.env)
    if value is None:
        return default
    if setting.kind is bool:
        return value.lower() not in {"0", "false", "no", "off"}
    try:
        return setting.kind(value)
    except ValueError as exc:
        raise SystemExit(f"{setting.env[0]} must be {setting.kind.__name__}, got {value!r}") from exc


def env_str(env: Mapping[str, str], *names: str, default: str | None = None) -> str | None:
    """The first of ``names`` set (non-empty) in ``env``, else ``default``."""
    for name in names:
        value = env.get(name)
        if value:
            return value
    return default


def process_env() -> Mapping[str, str]:
    """The environment, read when a process starts (never at import time)."""
    return dict(os.environ)


def reference_markdown() -> str:
    """docs/configuration.md: every setting of every service, as ``SETTINGS`` declares it
    (``make docs`` writes it; a test checks it is current)."""
    lines = [
        "# Configuration",
        "",
        "Generated from `SETTINGS` in `common/settings.py` by `make docs`; do not edit by hand.",
        "Each setting is read from its flag, else from the first of its environment variables that is",
        "set (TGI's names, so a TGI deployment's env block works unchanged), else its default.",
        "",
        "| flag | environment | services | type | default | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        default = "" if s.default is None else f"`{s.default}`"
        choices = f" (one of {', '.join(f'`{c}`' for c in s.choices)})" if s.choices else ""
        lines.append(
            f"| `{s.flag}` | {', '.join(f'`{e}`' for e in s.env)} | {', '.join(s.services)} | {s.kind.__name__} "
            f"| {default} | {s.help}{choices} |"
        )
    lines += ["", "Read from the environment only, by every service:", "", "| environment | meaning |", "|---|---|"]
    lines += [f"| `{names}` | {meaning} |" for names, meaning in ENVIRONMENT_ONLY]
    return "\n".join(lines) + "\n"
