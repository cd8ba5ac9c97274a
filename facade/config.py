"""Facade configuration: flags, with TGI's environment names as fallback."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.grpc_security import TlsConfig
from common.settings import env_option
from common.tracing import add_tracing_args


@dataclass(frozen=True)
class FacadeConfig:
    hostname: str
    port: int
    #: The router's public gRPC address.
    router: str
    #: Largest accepted request body, in bytes.
    payload_limit: int
    #: Bearer token every route but /health requires; None = open.
    api_key: str | None = None
    #: Origins allowed by CORS ("*" for any); empty = no CORS headers.
    cors_allow_origin: list[str] = field(default_factory=list)
    otlp_endpoint: str | None = None
    otlp_service_name: str = "switchyard-facade"
    #: A second key that opens only /metrics (for a Prometheus scraping the public port).
    metrics_api_key: str | None = None
    #: A second listener serving only /metrics without a key (keep it off the public network); None = none.
    metrics_port: int | None = None
    #: TLS of the channel to the router (GRPC_TLS_*).
    tls: TlsConfig = field(default_factory=TlsConfig)
    #: Responses kept in memory for previous_response_id and GET /v1/responses/{id}.
    responses_store_size: int = 1000


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The facade's settings: flags whose defaults come from the environment names in their help."""
    p = argparse.ArgumentParser(prog="python -m facade", description="OpenAI-compatible HTTP API over the router.")
    env_option(p, env, "--hostname", "HOSTNAME", default="0.0.0.0")
    env_option(p, env, "--port", "PORT", kind=int, default=8080)
    env_option(p, env, "--router", "ROUTER_ADDRESS", default="127.0.0.1:50051", help="the router's public gRPC address")
    env_option(p, env, "--payload-limit", "PAYLOAD_LIMIT", kind=int, default=2_000_000, help="largest body, bytes")
    env_option(p, env, "--api-key", "API_KEY", help="bearer key every route but /health requires")
    env_option(p, env, "--cors-allow-origin", "CORS_ALLOW_ORIGIN", default="", help="comma-separated origins, or *")
    env_option(p, env, "--metrics-api-key", "METRICS_API_KEY", help="a key that opens /metrics only")
    env_option(p, env, "--metrics-port", "METRICS_PORT", kind=int, help="a key-less listener serving /metrics only")
    env_option(p, env, "--responses-store-size", "RESPONSES_STORE_SIZE", kind=int, default=1000,
               help="responses kept for previous_response_id")  # fmt: skip
    add_tracing_args(p, env, "switchyard-facade")
    return p


def parse_config(argv: Sequence[str] | None, env: Mapping[str, str]) -> FacadeConfig:
    p = build_parser(env)
    a = p.parse_args(argv)
    origins = [o.strip() for o in a.cors_allow_origin.split(",") if o.strip()]
    return FacadeConfig(
        a.hostname,
        a.port,
        a.router,
        a.payload_limit,
        a.api_key,
        origins,
        a.otlp_endpoint,
        a.otlp_service_name,
        a.metrics_api_key,
        a.metrics_port,
        TlsConfig.from_env(env),
        a.responses_store_size,
    )
