"""The error every validation step raises: INVALID_ARGUMENT naming the request field."""

from __future__ import annotations

import grpc

from common.grpc_errors import ServiceError


class ValidationError(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
