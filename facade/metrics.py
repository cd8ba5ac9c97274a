"""The facade's own Prometheus metrics (HTTP traffic), served with the router's at ``/metrics``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FacadeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "switchyard_http_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.duration = Histogram(
            "switchyard_http_request_duration",
            "HTTP request duration (s), to the last byte",
            ["route"],
            registry=self.registry,
        )

    def middleware(self) -> Middleware:
        @web.middleware
        async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            response = await handler(request)
            route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
            self.requests.labels(route, str(response.status)).inc()
            self.duration.labels(route).observe(time.perf_counter() - started)
            return response

        return observe

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
