"""The facade's own Prometheus metrics (HTTP traffic), served with the router's at ``/metrics``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Routes whose refusals are generation requests refused (TGI counts them in tgi_request_failure).
GENERATION_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/generate", "/generate_stream", "/"}
)


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

        #: Generation requests this facade refused before they reached the router (a body that
        #: is not valid JSON, an unknown field, ...): the router never saw them, so they are
        #: added to its TGI counters here (``with_refusals``).
        self.validation_refusals = 0

    def refused_by_facade(self, path: str) -> None:
        if path in GENERATION_PATHS:
            self.validation_refusals += 1

    def with_refusals(self, router_text: bytes) -> bytes:
        """The router's exposition with this facade's refusals added to TGI's request counters
        (``tgi_request_count`` and ``tgi_request_failure{err="validation"}``), as TGI's own
        router counts a request its validation refuses."""
        if not self.validation_refusals:
            return router_text
        lines = router_text.decode().split("\n")
        _add_to_series(lines, "tgi_request_count", "tgi_request_count", self.validation_refusals)
        series = 'tgi_request_failure{err="validation"}'
        _add_to_series(lines, "tgi_request_failure", series, self.validation_refusals)
        return "\n".join(lines).encode()

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


def _add_to_series(lines: list[str], family: str, series: str, amount: int) -> None:
    """Adds ``amount`` to ``series``'s sample in ``lines``, or adds the sample under its family's
    TYPE line when the router has none yet."""
    for i, line in enumerate(lines):
        name, _, value = line.rpartition(" ")
        if name == series:
            lines[i] = f"{series} {float(value) + amount}"
            return
    for i, line in enumerate(lines):
        if line == f"# TYPE {family} counter":
            lines.insert(i + 1, f"{series} {float(amount)}")
            return
    lines += [f"# TYPE {family} counter", f"{series} {float(amount)}"]
