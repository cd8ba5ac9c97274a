"""Facade configuration: flags, with TGI's environment names as fallback."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.grpc_security import TlsConfig
from common.settings import FACADE, config_from, default_of, parser_for


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
    responses_store_size: int = default_of(FACADE, "responses_store_size")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The facade's settings (common.settings.SETTINGS), defaults read from ``env``."""
    return parser_for(FACADE, env, "OpenAI-compatible HTTP API over the router.")


def parse_config(argv: Sequence[str] | None, env: Mapping[str, str]) -> FacadeConfig:
    p = build_parser(env)
    a = p.parse_args(argv)
    origins = [o.strip() for o in a.cors_allow_origin.split(",") if o.strip()]
    return config_from(FacadeConfig, a, cors_allow_origin=origins, tls=TlsConfig.from_env(env))
