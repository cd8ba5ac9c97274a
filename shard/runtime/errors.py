"""Errors the shard reports to the router as gRPC statuses."""

from __future__ import annotations

import grpc

from common.grpc_errors import ServiceError


class InvalidRequest(ServiceError):
    """The router asked for something impossible: INVALID_ARGUMENT (NOT_FOUND for unknown ids)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, not_found: bool = False):
        super().__init__(message, code=grpc.StatusCode.NOT_FOUND if not_found else None)


class CapacityError(ServiceError):
    """The request does not fit what the shard holds, or the shard is not ready: FAILED_PRECONDITION."""

    code = grpc.StatusCode.FAILED_PRECONDITION
