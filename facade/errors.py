"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import grpc
import orjson
from aiohttp import web

from common.grpc_errors import param_of

#: Router field names that OpenAI clients know under another name.
_OPENAI_PARAM = {"max_new_tokens": "max_tokens"}

_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    # The router dropped the call (shutting down, or its own deadline): retry, not a server bug.
    grpc.StatusCode.CANCELLED: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class ApiError(Exception):
    """An error to answer with; raised anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=orjson.dumps(self.body()), content_type="application/json")


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, None)


def from_grpc(error: grpc.aio.AioRpcError) -> ApiError:
    status, type_ = _GRPC_TO_HTTP.get(error.code(), (500, "internal_error"))
    param = param_of(error)
    message = error.details() or error.code().name
    if status == 500:
        message = f"the server failed to process the request: {message}"
    return ApiError(status, message, type_, _OPENAI_PARAM.get(param or "", param), error.code().name.lower())
