"""Every exception of the router: those it reports to callers, with the gRPC status they
mean, and the two it raises and catches internally.

The messages of reported errors are written for the end user (the facade passes
them on): no gRPC debug strings, addresses or stack traces; those go to the log.
"""

from __future__ import annotations

import grpc

from common.grpc_errors import ServiceError


class ValidationError(ServiceError):
    """A request field is wrong: INVALID_ARGUMENT naming the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(ServiceError):
    """MAX_CONCURRENT_REQUESTS are in flight: RESOURCE_EXHAUSTED (HTTP 429)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ShuttingDown(ServiceError):
    """SIGTERM: requests in flight finish, new ones are refused (HTTP 503)."""

    code = grpc.StatusCode.UNAVAILABLE


class ShardsUnavailable(ServiceError):
    """The shards are restarting or unreachable: UNAVAILABLE (HTTP 503), worth retrying."""

    code = grpc.StatusCode.UNAVAILABLE


class ShardFailure(ServiceError):
    """A shard step failed although the shard is up; the requests it carried end with this error."""


class OutOfBlocks(RuntimeError):
    """Internal: the KV block allocator cannot satisfy a request now (the scheduler waits or preempts)."""


class NoChatTemplate(ValueError):
    """Internal: the tokenizer has no chat template (validation turns it into a ValidationError)."""
