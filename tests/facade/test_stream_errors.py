"""The facade against a fake router: failures after a stream started arrive as SSE error events."""

from __future__ import annotations

import json

import grpc
import pytest

from facade.app import create_app
from facade.config import FacadeConfig
from protos import router_pb2 as pb
from protos import router_pb2_grpc as pb_grpc


class FailingRouter(pb_grpc.RouterServicer):
    """Streams two tokens, then fails as a crashed shard would."""

    async def GenerateStream(self, request, context):
        yield pb.GenerateStreamResponse(text="Hello", tokens=[pb.Token(id=1)])
        yield pb.GenerateStreamResponse(text=" there", tokens=[pb.Token(id=2)])
        await context.abort(grpc.StatusCode.INTERNAL, "the model shard failed: boom")

    async def Generate(self, request, context):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded")


@pytest.fixture
async def facade_client(aiohttp_client, tmp_path):
    address = f"unix://{tmp_path / 'router.sock'}"
    server = grpc.aio.server()
    pb_grpc.add_RouterServicer_to_server(FailingRouter(), server)
    server.add_insecure_port(address)
    await server.start()
    client = await aiohttp_client(create_app(FacadeConfig("127.0.0.1", 0, address, 1_000_000)))
    yield client
    await server.stop(None)


async def test_error_after_stream_start_is_an_sse_event(facade_client):
    r = await facade_client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    assert r.status == 200
    events = [line[6:] for line in (await r.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert "shard failed" in error["error"]["message"]
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert "".join(c or "" for c in contents) == "Hello there"


async def test_overload_maps_to_429(facade_client):
    r = await facade_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 429
    assert (await r.json())["error"]["type"] == "rate_limit_exceeded"
