"""Typed application state."""

from __future__ import annotations

from aiohttp import web

from facade.metrics import FacadeMetrics
from protos import router_pb2_grpc

ROUTER = web.AppKey("router", router_pb2_grpc.RouterStub)
METRICS = web.AppKey("metrics", FacadeMetrics)
STARTED_AT = web.AppKey("started_at", int)
