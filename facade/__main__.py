"""``python -m facade``: serve the HTTP API."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from common.settings import process_env
from common.tracing import setup_tracing
from facade.app import create_app
from facade.config import parse_config

log = logging.getLogger("facade")

#: Probes and scrapes, every few seconds: not worth a line each.
_QUIET_PATHS = frozenset({"/health", "/metrics"})


class AccessLogger(AbstractAccessLogger):
    """One line per request: client, method and path, status, seconds to the last byte."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path not in _QUIET_PATHS:
            self.logger.info('%s "%s %s" %d %.3fs', request.remote, request.method, request.path, response.status, time)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s facade %(levelname)s %(message)s", stream=sys.stderr)
    config = parse_config(argv, process_env())
    tracing = setup_tracing(config.otlp_service_name, config.otlp_endpoint)
    # handler_cancellation: a client that disconnects cancels its handler, which
    # cancels the router call and frees the request's KV blocks.
    app = create_app(config, tracing)

    async def announce(_app: web.Application) -> None:
        log.info("serving HTTP on %s:%d (router at %s)", config.hostname, config.port, config.router)

    app.on_startup.append(announce)
    web.run_app(
        app,
        host=config.hostname,
        port=config.port,
        handler_cancellation=True,
        access_log=logging.getLogger("facade.access"),
        access_log_class=AccessLogger,
        print=lambda *_: None,
    )


if __name__ == "__main__":
    main()
