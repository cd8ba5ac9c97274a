"""``python -m facade``: serve the HTTP API."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from common.settings import process_env
from common.tracing import setup_tracing
from facade.app import create_app
from facade.config import parse_config


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s facade %(levelname)s %(message)s", stream=sys.stderr)
    config = parse_config(argv, process_env())
    tracing = setup_tracing(config.otlp_service_name, config.otlp_endpoint)
    # handler_cancellation: a client that disconnects cancels its handler, which
    # cancels the router call and frees the request's KV blocks.
    web.run_app(
        create_app(config, tracing),
        host=config.hostname,
        port=config.port,
        handler_cancellation=True,
        access_log=None,
        print=lambda *_: None,
    )


if __name__ == "__main__":
    main()
