"""A generation request the facade itself refuses counts in TGI's failure counter, as one the
router refuses does (issue table: tgi_request_failure{err="validation"})."""

from __future__ import annotations

import pytest

from facade.app import create_app
from facade.config import parse_config
from protos import router_pb2 as pb
from protos import router_pb2_grpc as pb_grpc
from router.metrics import RouterMetrics
from tests.facade.fake_router import serving

VALIDATION = 'tgi_request_failure{err="validation"}'


class CountingRouter(pb_grpc.RouterServicer):
    """Answers Metrics with a real router's exposition, in which it refused one request itself."""

    def __init__(self) -> None:
        self.metrics = RouterMetrics()
        self.metrics.request_refused("validation")

    async def Metrics(self, request, context):
        return pb.MetricsResponse(text=self.metrics.exposition().decode())


def _samples(text: str) -> dict[str, float]:
    """Series -> value (TGI's counters are written without ``_total``, which the Prometheus
    parser would expect, so plain lines are read)."""
    lines = [line.rpartition(" ") for line in text.splitlines() if line and not line.startswith("#")]
    return {series: float(value) for series, _, value in lines}


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    async with serving(CountingRouter(), tmp_path) as (address, _):
        config = parse_config(["--router", address, "--hostname", "127.0.0.1"], {})
        yield await aiohttp_client(create_app(config))


async def test_facade_refusals_join_the_routers_validation_count(client):
    before = _samples(await (await client.get("/metrics")).text())
    assert before[VALIDATION] == 1  # the router's own
    assert (await client.post("/v1/chat/completions", data=b"{not json")).status == 400
    assert (await client.post("/v1/chat/completions", json={"messages": [], "bogus": 1})).status == 400
    assert (await client.post("/generate", json={"inputs": ""})).status == 400
    assert (await client.post("/v1/completions", json={"prompt": "x", "n": "two"})).status == 400
    assert (await client.post("/tokenize", json={})).status == 400  # not a generation: not counted
    after = _samples(await (await client.get("/metrics")).text())
    assert after[VALIDATION] == 5
    assert after["tgi_request_count"] == before["tgi_request_count"] + 4
