"""``create_app(config)``: the aiohttp application."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from common.grpc_channels import RECONNECT_OPTIONS
from common.grpc_security import api_key_interceptors
from common.tracing import Tracing
from facade import sse
from facade.config import FacadeConfig
from facade.errors import ApiError, error_shape
from facade.metrics import FacadeMetrics
from facade.openai_responses import STORE as RESPONSES
from facade.responses_request import ResponseStore
from facade.routes import ROUTES
from facade.routes import metrics as metrics_route
from facade.security import Cors, api_key_middleware
from facade.state import METRICS, ROUTER, STARTED_AT
from facade.tracing import tracing_middleware
from protos import router_pb2_grpc

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as an OpenAI-shaped error body; faults never show a stack trace."""
    try:
        return await handler(request)
    except ApiError as exc:
        if exc.status in (400, 413) and not exc.from_router:
            request.app[METRICS].refused_by_facade(request.path)
        return await sse.end_with_error(request, exc) or exc.response(error_shape(request))
    except web.HTTPRequestEntityTooLarge as exc:
        request.app[METRICS].refused_by_facade(request.path)
        too_large = ApiError(413, f"the request body is too large: {exc.text}", "invalid_request_error")
        return too_large.response(error_shape(request))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"{request.method} {request.path}: {exc.reason}"
        type_ = "invalid_request_error" if exc.status < 500 else "internal_error"
        return ApiError(exc.status, message, type_).response()
    except Exception:
        fault_id = uuid.uuid4().hex[:12]
        log.exception("fault %s handling %s %s", fault_id, request.method, request.path)
        error = ApiError(500, f"internal error (fault id {fault_id})", "internal_error")
        return await sse.end_with_error(request, error) or error.response(error_shape(request))


def create_app(config: FacadeConfig, tracing: Tracing | None = None) -> web.Application:
    tracing = tracing or Tracing()
    metrics = FacadeMetrics()
    cors = Cors(config.cors_allow_origin)
    # Outermost first: metrics see the status the error middleware settled on;
    # preflight requests are answered before authentication.
    middlewares = [metrics.middleware(), openai_errors, cors.middleware()]
    if config.api_key:
        middlewares.append(api_key_middleware(config.api_key, config.metrics_api_key))
    if tracing.provider is not None:
        middlewares.insert(0, tracing_middleware(tracing))
    app = web.Application(middlewares=middlewares, client_max_size=config.payload_limit)
    app.on_response_prepare.append(cors.on_prepare)
    app[STARTED_AT] = int(time.time())
    app[METRICS] = metrics
    app[RESPONSES] = ResponseStore(config.responses_store_size)

    async def router_channel(app: web.Application) -> AsyncIterator[None]:
        # The trace context travels to the router in gRPC metadata.
        # The router honours the same API_KEY as the HTTP API.
        interceptors = [*tracing.grpc_client_interceptors(), *api_key_interceptors(config.api_key)]
        async with config.tls.channel(config.router, list(RECONNECT_OPTIONS), interceptors) as channel:
            app[ROUTER] = router_pb2_grpc.RouterStub(channel)
            yield

    app.cleanup_ctx.append(router_channel)
    if config.metrics_port is not None:
        app.cleanup_ctx.append(_metrics_listener(config.hostname, config.metrics_port))
    app.router.add_routes(ROUTES)
    return app


def _metrics_listener(host: str, port: int) -> Callable[[web.Application], AsyncIterator[None]]:
    """METRICS_PORT: /metrics alone, without a key, for a scraper on the private network."""

    async def serve(app: web.Application) -> AsyncIterator[None]:
        metrics_app = web.Application()
        metrics_app[ROUTER], metrics_app[METRICS] = app[ROUTER], app[METRICS]
        metrics_app.router.add_get("/metrics", metrics_route)
        runner = web.AppRunner(metrics_app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        yield
        await runner.cleanup()

    return serve
