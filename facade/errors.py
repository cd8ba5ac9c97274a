"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
import uuid

import grpc
import orjson
from aiohttp import web

from common.grpc_errors import param_of, written_for_users

log = logging.getLogger(__name__)

#: Router field names that OpenAI clients know under another name.
_OPENAI_PARAM = {"max_new_tokens": "max_tokens", "adapter": "parameters.adapter_id"}

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

#: What a client reads when gRPC itself ended the call (its text names sockets and
#: transport internals, which go to the log with a fault id instead).
_TRANSPORT_MESSAGE = {
    grpc.StatusCode.UNAVAILABLE: "the model server is unavailable (starting or restarting); retry shortly",
    grpc.StatusCode.CANCELLED: "the model server dropped the request (it restarted or is stopping); retry it",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the model server did not answer in time",
}

#: OpenAI error types -> TGI's error_type values.
_TGI_ERROR_TYPE = {
    "invalid_request_error": "validation",
    "rate_limit_exceeded": "overloaded",
    "service_unavailable": "unavailable",
    "internal_error": "generation",
}

#: Seconds a client is asked to wait before retrying a 503 or 429: a restarted service
#: is back within seconds, and the facade reconnects within one.
RETRY_AFTER_S = 1


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
        self.headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else {}
        #: The router refused or failed it (and counted it); False for the facade's own refusals.
        self.from_router = False

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def tgi_body(self) -> dict:
        """TGI's error shape, which its clients (text-generation, huggingface_hub) parse."""
        return {"error": self.message, "error_type": _TGI_ERROR_TYPE.get(self.type, self.type)}

    def response(self, shape: str = "openai") -> web.Response:
        body = self.tgi_body() if shape == "tgi" else self.body()
        return web.Response(
            status=self.status, body=orjson.dumps(body), content_type="application/json", headers=self.headers
        )


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, None)


def from_grpc(error: grpc.aio.AioRpcError) -> ApiError:
    status, type_ = _GRPC_TO_HTTP.get(error.code(), (500, "internal_error"))
    param = param_of(error)
    if written_for_users(error):
        message = error.details() or error.code().name
    else:
        fault_id = uuid.uuid4().hex[:12]
        log.warning("fault %s: router call ended by gRPC: %s %s", fault_id, error.code().name, error.details())
        generic = _TRANSPORT_MESSAGE.get(error.code(), "internal error")
        message = f"{generic} (fault id {fault_id})"
    code = error.code().name.lower()
    if error.code() == grpc.StatusCode.NOT_FOUND and param in ("model", "adapter", "lora_name"):
        code = "model_not_found"  # OpenAI's code for a model (here: an adapter) that is not served
    api_error = ApiError(status, message, type_, _OPENAI_PARAM.get(param or "", param), code)
    api_error.from_router = True
    return api_error


#: TGI's native routes answer errors in TGI's shape; /tokenize does when given TGI's body.
TGI_PATHS = frozenset({"/generate", "/generate_stream", "/"})
_SHAPE = web.RequestKey("error_shape", str)


def use_tgi_errors(request: web.Request) -> None:
    request[_SHAPE] = "tgi"


def error_shape(request: web.Request) -> str:
    return "tgi" if request.path in TGI_PATHS else request.get(_SHAPE, "openai")
