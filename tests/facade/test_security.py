"""The HTTP API's keys: bearer scheme in any case, a metrics-only key, a key-less metrics port."""

from __future__ import annotations

import grpc
import httpx
import pytest

from common.ports import free_port
from facade.app import create_app
from facade.config import FacadeConfig, parse_config
from protos import router_pb2 as pb
from protos import router_pb2_grpc as pb_grpc
from tests.facade.fake_router import serving

KEY, METRICS_KEY = "sk-api", "sk-metrics"


class MetricsRouter(pb_grpc.RouterServicer):
    """Expects the facade to forward API_KEY to it, as the real router requires."""

    async def Metrics(self, request, context):
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {KEY}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no key")
        return pb.MetricsResponse(text="router_series 1\n")

    async def Health(self, request, context):
        return pb.HealthResponse()


@pytest.fixture
async def router_address(tmp_path):
    async with serving(MetricsRouter(), tmp_path) as (address, _):
        yield address


def _config(router: str, **overrides) -> FacadeConfig:
    env = {"API_KEY": KEY, "METRICS_API_KEY": METRICS_KEY, **overrides}
    return parse_config(["--router", router, "--hostname", "127.0.0.1"], env)


async def test_keys_open_what_they_should(aiohttp_client, router_address):
    client = await aiohttp_client(create_app(_config(router_address)))
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = await client.get("/metrics", headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status == 200, scheme
        assert "router_series 1" in await r.text()  # the facade passed the key on to the router
    assert (await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})).status == 200
    assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {METRICS_KEY}"})).status == 401
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/health")).status == 200


async def test_a_metrics_port_serves_metrics_without_a_key(aiohttp_client, router_address):
    port = free_port()
    client = await aiohttp_client(create_app(_config(router_address, METRICS_PORT=str(port))))
    assert (await client.get("/metrics")).status == 401  # the public port still wants a key
    async with httpx.AsyncClient() as scraper:
        r = await scraper.get(f"http://127.0.0.1:{port}/metrics")
        assert r.status_code == 200 and "router_series 1" in r.text
        assert (await scraper.get(f"http://127.0.0.1:{port}/v1/models")).status_code == 404
