"""API-key authentication and CORS, as middlewares."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from common.grpc_security import bearer_matches
from facade.errors import ApiError
from facade.pages import is_open_page

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Routes a load balancer or orchestrator probes without credentials.
OPEN_PATHS = frozenset({"/health"})


#: The route a metrics key (METRICS_API_KEY) opens.
METRICS_PATH = "/metrics"


def api_key_middleware(api_key: str, metrics_api_key: str | None = None) -> Middleware:
    """Requires ``Authorization: Bearer <api_key>`` (scheme in any case); /metrics also takes the metrics key."""

    @web.middleware
    async def require_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" or request.path in OPEN_PATHS or is_open_page(request):
            return await handler(request)
        given = request.headers.get("Authorization", "")
        allowed = bearer_matches(given, api_key)
        if metrics_api_key and request.path == METRICS_PATH:
            allowed = bearer_matches(given, metrics_api_key) or allowed
        if not allowed:
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           "invalid_request_error", None, "invalid_api_key")  # fmt: skip
        return await handler(request)

    return require_key


class Cors:
    """CORS for ``CORS_ALLOW_ORIGIN`` (comma-separated origins, or ``*``).

    Headers are added as responses are prepared, so streamed (SSE) responses get
    them too; preflight requests are answered by the middleware.
    """

    def __init__(self, allowed: list[str]):
        self.any_origin = "*" in allowed
        self.allowed = frozenset(allowed)

    def _allow(self, request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        return origin if origin and (self.any_origin or origin in self.allowed) else None

    def middleware(self) -> Middleware:
        @web.middleware
        async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                return web.Response(status=204 if self._allow(request) else 403)
            return await handler(request)

        return preflight

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        allow = self._allow(request)
        if allow:
            response.headers["Access-Control-Allow-Origin"] = "*" if self.any_origin else allow
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            if not self.any_origin:
                response.headers["Vary"] = "Origin"
