"""A span per HTTP request, continuing the caller's W3C ``traceparent``.

OpenTelemetry's aiohttp-server instrumentation keeps its tracer and URL filters in
module globals set by a process-wide ``instrument()`` call, which patches
``aiohttp.web.Application`` for everyone; with an explicit provider per service
(and several services in one test process) that does not fit, so this is the
same middleware on the explicit provider. Context extraction is OpenTelemetry's
own propagator, not hand-written parsing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode

from common.tracing import Tracing

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Probed and scraped every few seconds: a trace each would bury the requests that matter.
UNTRACED_PATHS = frozenset({"/health", "/metrics"})


def tracing_middleware(tracing: Tracing) -> Middleware:
    tracer = tracing.tracer("switchyard.facade")

    @web.middleware
    async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in UNTRACED_PATHS:
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource else request.path
        with tracer.start_as_current_span(
            f"{request.method} {route}",
            context=propagate.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": route, "url.path": request.path},
        ) as span:
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    return traced
