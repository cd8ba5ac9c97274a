"""One place where exceptions become gRPC statuses, for every service.

Services raise ``ServiceError`` subclasses with the status they mean; anything
else is a fault, logged with an id and reported as INTERNAL without a stack
trace. ``PARAM_KEY`` trailing metadata names the offending request field so the
facade can fill OpenAI's ``error.param``; ``MESSAGE_KEY`` marks a status whose
message our service wrote for the end user (a status gRPC itself made, such as
"failed to connect to all addresses; ... unix:/tmp/...", carries debug text the
facade must not pass on).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

PARAM_KEY = "switchyard-param"
MESSAGE_KEY = "switchyard-message"


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, param: str | None = None, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        mark = ((MESSAGE_KEY, "1"),)
        return ((PARAM_KEY, self.param), *mark) if self.param else mark


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, str(exc), trailing_metadata=exc.trailing_metadata())
    fault_id = uuid.uuid4().hex[:12]
    log.exception("internal fault %s", fault_id, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error (fault id {fault_id})", trailing_metadata=((MESSAGE_KEY, "1"),)
    )


def _wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return handler


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _metadata(error: grpc.aio.AioRpcError, wanted: str) -> str | None:
    for key, value in error.trailing_metadata() or ():
        if key == wanted:
            return str(value)
    return None


def param_of(error: grpc.aio.AioRpcError) -> str | None:
    """The request field a status names, if any."""
    return _metadata(error, PARAM_KEY)


def written_for_users(error: grpc.aio.AioRpcError) -> bool:
    """Whether the status message came from our services (else it is gRPC's own, for logs only)."""
    return _metadata(error, MESSAGE_KEY) == "1"
