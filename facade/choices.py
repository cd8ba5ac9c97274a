"""Running the router calls behind one HTTP request: one per choice (``n``) and prompt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from facade.errors import from_grpc
from protos import router_pb2 as pb
from protos import router_pb2_grpc as pb_grpc


async def router_info(router: pb_grpc.RouterStub) -> pb.InfoResponse:
    try:
        return await router.Info(pb.InfoRequest(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc) from exc


async def generate_all(router: pb_grpc.RouterStub, requests: list[pb.GenerateRequest]) -> list[pb.GenerateResponse]:
    calls = [router.Generate(r) for r in requests]
    try:
        return list(await asyncio.gather(*calls))
    except grpc.aio.AioRpcError as exc:
        for call in calls:
            call.cancel()
        raise from_grpc(exc) from exc


def cumulative_logprob(answer: pb.GenerateResponse) -> float:
    """How likely the model finds an answer: the sum of its tokens' logprobs (best_of's score)."""
    return sum(t.logprob for t in answer.tokens)


async def best_of(
    router: pb_grpc.RouterStub, candidates: list[pb.GenerateRequest]
) -> list[tuple[int, pb.GenerateResponse]]:
    """Runs ``candidates`` of one prompt; returns every answer with its candidate's index, the most
    likely (``cumulative_logprob``) first, ties in candidate order.

    The candidates share the prompt's KV blocks: the first runs alone until its first token
    comes, by which time the router's prefix cache holds the prompt's full blocks, and the
    others start then and are served those blocks instead of computing the prompt again."""
    first = router.GenerateStream(candidates[0])
    rest: list[Any] = []
    try:
        opening = await first.read()
        rest = [router.Generate(r) for r in candidates[1:]]
        answers = await asyncio.gather(_collect(opening, first), *rest)
    except grpc.aio.AioRpcError as exc:
        for call in [first, *rest]:
            call.cancel()
        raise from_grpc(exc) from exc
    return sorted(enumerate(answers), key=lambda pair: -cumulative_logprob(pair[1]))


async def _collect(opening: Any, call: Any) -> pb.GenerateResponse:
    """A GenerateStream call's messages (its first already read) as one GenerateResponse."""
    answer = pb.GenerateResponse()
    message = opening
    while message is not grpc.aio.EOF:
        answer.text += message.text
        answer.reasoning += message.reasoning
        answer.tokens.extend(message.tokens)
        if message.finish_reason:
            answer.finish_reason = message.finish_reason
            answer.usage.CopyFrom(message.usage)
            answer.tool_calls.extend(message.tool_calls)
        message = await call.read()
    return answer


class StreamSet:
    """Several GenerateStream calls read as one stream of (choice index, message).

    ``start`` reads every call's first message before the HTTP response is
    committed, so that a rejected request still gets a proper HTTP status.
    ``close`` cancels whatever still runs: a client that leaves frees its
    requests' KV blocks at once.
    """

    def __init__(self, router: pb_grpc.RouterStub, requests: list[pb.GenerateRequest]):
        self._calls = [router.GenerateStream(r) for r in requests]
        self._first: list[Any] = []

    async def start(self) -> None:
        try:
            self._first = list(await asyncio.gather(*(c.read() for c in self._calls)))
        except grpc.aio.AioRpcError as exc:
            self.close()
            raise from_grpc(exc) from exc

    async def messages(self) -> AsyncIterator[tuple[int, pb.GenerateStreamResponse]]:
        """Messages in arrival order; raises ApiError if a call fails mid-stream."""
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(index: int) -> None:
            message = self._first[index]
            try:
                while message is not grpc.aio.EOF:
                    await queue.put((index, message))
                    message = await self._calls[index].read()
            except grpc.aio.AioRpcError as exc:
                await queue.put((index, exc))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self._calls))]
        open_calls = len(tasks)
        try:
            while open_calls:
                index, item = await queue.get()
                if item is None:
                    open_calls -= 1
                elif isinstance(item, grpc.aio.AioRpcError):
                    raise from_grpc(item)
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    def close(self) -> None:
        for call in self._calls:
            call.cancel()
