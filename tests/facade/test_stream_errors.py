"""The facade against a fake router: failures after a stream started arrive as SSE error events."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from common.grpc_errors import MESSAGE_KEY
from facade.app import create_app
from facade.config import FacadeConfig
from protos import router_pb2 as pb
from protos import router_pb2_grpc as pb_grpc
from tests.facade.fake_router import serving

USER_MESSAGE = ((MESSAGE_KEY, "1"),)
TOP = [pb.TopToken(id=7, logprob=-0.5, text="x"), pb.TopToken(id=8, logprob=-1.5, text="y")]


class FailingRouter(pb_grpc.RouterServicer):
    """Streams two tokens, then fails as a crashed shard would (prompt "hang": waits until the server stops)."""

    async def GenerateStream(self, request, context):
        yield pb.GenerateStreamResponse(text="Hello", tokens=[pb.Token(id=1, text="Hello", top=TOP)])
        yield pb.GenerateStreamResponse(text=" there", tokens=[pb.Token(id=2, text=" there", top=TOP)])
        if request.prompt == "hang":
            await asyncio.Event().wait()
        await context.abort(grpc.StatusCode.INTERNAL, "the model shard failed: boom", trailing_metadata=USER_MESSAGE)

    async def Generate(self, request, context):
        if request.prompt == "details":
            tokens = [pb.Token(id=1, text="Hello", top=TOP)]
            return pb.GenerateResponse(text="Hello", finish_reason=pb.FINISH_REASON_LENGTH, tokens=tokens)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", trailing_metadata=USER_MESSAGE)


@pytest.fixture
async def router_server(tmp_path):
    async with serving(FailingRouter(), tmp_path) as running:
        yield running


@pytest.fixture
async def facade_client(aiohttp_client, router_server):
    return await aiohttp_client(create_app(FacadeConfig("127.0.0.1", 0, router_server[0], 1_000_000)))


def _events(text: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("data:")]


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
    assert r.headers["Retry-After"] == "1"
    assert (await r.json())["error"]["type"] == "rate_limit_exceeded"


async def test_a_router_that_dies_mid_stream_ends_it_with_a_clean_event(facade_client, router_server):
    r = await facade_client.post("/v1/completions", json={"prompt": "hang", "stream": True})
    assert r.status == 200
    await r.content.readuntil(b" there")
    await router_server[1].stop(None)  # as a killed router: the call ends with gRPC's own status
    events = _events(await r.text())
    assert events[-1] == "[DONE]"
    message = json.loads(events[-2])["error"]["message"]
    assert "retry" in message and "fault id" in message
    assert "unix:" not in message and "Socket" not in message and "router.sock" not in message


async def test_the_router_being_away_is_503_with_retry_after(aiohttp_client, tmp_path):
    client = await aiohttp_client(create_app(FacadeConfig("127.0.0.1", 0, f"unix://{tmp_path}/none.sock", 1000)))
    for path in ("/health", "/v1/models"):
        r = await client.get(path)
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        message = (await r.json())["error"]["message"]
        assert str(tmp_path) not in message and "failed to connect" not in message, message
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 503 and "unavailable" in (await r.json())["error"]["message"]


@pytest.mark.parametrize("path", ["/generate", "/"])
async def test_tgi_details_with_top_n_tokens(facade_client, path):
    body = {"inputs": "details", "parameters": {"details": True, "top_n_tokens": 2}}
    r = await facade_client.post(path, json=body)
    assert r.status == 200, await r.text()
    answer = await r.json()
    details = (answer[0] if path == "/" else answer)["details"]
    assert details["top_tokens"][0] == [
        {"id": 7, "text": "x", "logprob": -0.5, "special": False},
        {"id": 8, "text": "y", "logprob": -1.5, "special": False},
    ]


async def test_tgi_stream_with_top_n_tokens_ends_with_a_tgi_error_event(facade_client):
    body = {"inputs": "hi", "parameters": {"details": True, "top_n_tokens": 2}}
    r = await facade_client.post("/generate_stream", json=body)
    assert r.status == 200
    events = [json.loads(e) for e in _events(await r.text())]
    assert [e["token"]["text"] for e in events[:2]] == ["Hello", " there"]
    assert events[0]["top_tokens"][1] == {"id": 8, "text": "y", "logprob": -1.5, "special": False}
    assert events[-1] == {"error": "the model shard failed: boom", "error_type": "generation"}
