"""One request, one trace: facade, router and shard spans share the caller's trace id.

The three services run in one process here (a fake shard engine, the real router
and the real facade app), exporting to one in-memory exporter.
"""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from common.tracing import setup_tracing
from facade.app import create_app
from facade.config import FacadeConfig
from router.server import RouterServicer, ServedModel, Serving, create_server
from tests.router.harness import fake_router

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


async def test_one_trace_across_facade_router_and_shard(tokenizer, aiohttp_client, tmp_path):
    exporter = InMemorySpanExporter()
    tracing = setup_tracing("switchyard-test", None, SimpleSpanProcessor(exporter))
    async with fake_router(tokenizer, tmp_path, tracing=tracing) as h:
        loop = asyncio.create_task(h.scheduler.run())
        router_address = f"unix://{tmp_path / 'router.sock'}"
        model = ServedModel("fake", "float32", "cpu", 1, 256)
        servicer = RouterServicer(
            8, tracing.tracer("switchyard.router"), Serving.of_scheduler(h.scheduler, h.validator, model)
        )
        server = create_server(servicer, router_address, tracing)
        await server.start()
        try:
            client = await aiohttp_client(create_app(FacadeConfig("127.0.0.1", 0, router_address, 100_000), tracing))
            assert (await client.get("/health")).status == 200 and (await client.get("/metrics")).status == 200
            r = await client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                headers={"traceparent": TRACEPARENT},
            )
            assert r.status == 200, await r.text()
        finally:
            loop.cancel()
            await server.stop(None)
    spans = exporter.get_finished_spans()
    in_trace = {s.name for s in spans if format(s.context.trace_id, "032x") == TRACE_ID}
    assert "POST /v1/chat/completions" in in_trace or any(n.startswith("POST") for n in in_trace), in_trace
    assert "/switchyard.router.v1.Router/Generate" in in_trace  # router RPC (server side)
    assert {"validate", "queue", "prefill", "decode"} <= in_trace  # router internals
    assert "/switchyard.shard.v1.ShardService/Prefill" in in_trace  # shard RPC (server side)
    assert {"shard.prefill", "shard.decode"} <= in_trace  # shard work
    probes = [s.name for s in spans if "Health" in s.name or "Metrics" in s.name or s.name.startswith("GET")]
    assert not probes, probes  # health probes and scrapes make no spans, at any hop
