"""Facade configuration: flags, with TGI's environment names as fallback."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.settings import env_int, env_str


@dataclass(frozen=True)
class FacadeConfig:
    hostname: str
    port: int
    #: The router's public gRPC address.
    router: str
    #: Largest accepted request body, in bytes.
    payload_limit: int


def parse_config(argv: Sequence[str] | None, env: Mapping[str, str]) -> FacadeConfig:
    p = argparse.ArgumentParser(prog="python -m facade", description="OpenAI-compatible HTTP API over the router.")
    p.add_argument("--hostname", default=env_str(env, "HOSTNAME", default="0.0.0.0"), help="[HOSTNAME]")
    p.add_argument("--port", type=int, default=env_int(env, "PORT", default=8080), help="[PORT]")
    p.add_argument(
        "--router",
        default=env_str(env, "ROUTER_ADDRESS", default="127.0.0.1:50051"),
        help="[ROUTER_ADDRESS]",
    )
    p.add_argument("--payload-limit", type=int, default=env_int(env, "PAYLOAD_LIMIT", default=2_000_000))
    a = p.parse_args(argv)
    return FacadeConfig(a.hostname, a.port, a.router, a.payload_limit)
