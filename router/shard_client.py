"""The router's side of shard.proto: dataclasses in, every rank called, rank 0's answer out."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from common import sampling_params
from common.grpc_channels import RECONNECT_OPTIONS
from common.grpc_security import TlsConfig
from protos import shard_pb2 as pb
from protos import shard_pb2_grpc as pb_grpc
from router.request import Request
from router.speculation import Guesses


@dataclass(frozen=True)
class ShardGeneration:
    request_id: int
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ShardInputScores:
    """Scores of input tokens first_position, first_position + 1, ... of a request (prompt logprobs)."""

    request_id: int
    first_position: int
    logprobs: list[float]
    ranks: list[int]
    top: list[tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class StepAnswer:
    generations: list[ShardGeneration]
    request_ids: list[int]
    forward_ns: int
    #: Shard time spent sampling (TGI's batch decode duration).
    decode_ns: int = 0
    input_scores: list[ShardInputScores] = field(default_factory=list)
    #: (request id, pooled vector) of embedding requests whose input completed.
    embeddings: list[tuple[int, list[float]]] = field(default_factory=list)


@dataclass(frozen=True)
class PrefillItem:
    """One request's share of a Prefill: compute ``chunk_len`` tokens after ``cache_len``."""

    request: Request
    cache_len: int
    chunk_len: int


@dataclass(frozen=True)
class DecodeOrder:
    """What a Decode carries besides the batch: prompt chunks, requests to drop, its place in order."""

    chunks: Sequence[PrefillItem] = ()
    #: Requests that left the batch since the last step (finished, cancelled).
    drop: Sequence[int] = ()
    #: This call's number; 0 for none.
    step_id: int = 0
    #: The call this one must run after (a pipelined step); 0 for none.
    after_step_id: int = 0
    #: Speculative guesses per decoding request id.
    guesses: Mapping[int, Guesses] = field(default_factory=dict)


class ShardClient:
    def __init__(self, channels: list[grpc.aio.Channel]):
        self._channels = channels
        self._stubs = [pb_grpc.ShardServiceStub(c) for c in channels]

    @classmethod
    async def connect(
        cls, entry: str, timeout: float, interceptors: list | None = None, tls: TlsConfig | None = None
    ) -> ShardClient:
        """Connects to rank 0, then to every rank it lists (``interceptors``: e.g. trace propagation)."""

        def channel(target: str) -> grpc.aio.Channel:
            return (tls or TlsConfig()).channel(target, _CHANNEL_OPTIONS, interceptors)

        channels = [channel(entry)]
        try:
            await asyncio.wait_for(channels[0].channel_ready(), timeout)
            urls = (await pb_grpc.ShardServiceStub(channels[0]).ServiceDiscovery(pb.ServiceDiscoveryRequest())).urls
            channels += [channel(u) for u in urls[1:]]
            # Every rank must be up before the first step: they run it together.
            await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels[1:])), timeout)
        except BaseException:
            await asyncio.gather(*(c.close() for c in channels))  # a retry must not leak channels
            raise
        return cls(channels)

    @property
    def world_size(self) -> int:
        return len(self._stubs)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def _all(self, method: str, message):  # type: ignore[no-untyped-def]
        # Every rank runs the same step; their answers agree, rank 0's is used.
        answers = await asyncio.gather(*(getattr(stub, method)(message) for stub in self._stubs))
        return answers[0]

    async def load_adapter(self, name: str, path: str) -> pb.LoadAdapterResponse:
        """Loads a LoRA adapter onto every rank (AioRpcError INVALID_ARGUMENT when it does not fit)."""
        return await self._all("LoadAdapter", pb.LoadAdapterRequest(name=name, path=path))

    async def unload_adapter(self, name: str) -> None:
        await self._all("UnloadAdapter", pb.UnloadAdapterRequest(name=name))

    async def info(self) -> pb.InfoResponse:
        return await self._stubs[0].Info(pb.InfoRequest())

    async def health(self, timeout_s: float) -> list[pb.HealthResponse]:
        """Every rank's health (raises AioRpcError if one does not answer within ``timeout_s``)."""
        request = pb.HealthRequest()
        return list(await asyncio.gather(*(stub.Health(request, timeout=timeout_s) for stub in self._stubs)))

    async def warmup(self, prefill_tokens: int, batch_size: int, total_tokens: int) -> pb.WarmupResponse:
        message = pb.WarmupRequest(
            max_batch_prefill_tokens=prefill_tokens,
            max_batch_size=batch_size,
            max_batch_total_tokens=total_tokens,
        )
        # Ranks may differ in free memory: the smallest cache bounds the replica.
        answers = await asyncio.gather(*(stub.Warmup(message) for stub in self._stubs))
        return min(answers, key=lambda a: a.num_blocks)

    async def prefill(self, batch_id: int, items: list[PrefillItem]) -> StepAnswer:
        batch = pb.Batch(id=batch_id, requests=[_request_pb(i) for i in items])
        answer = await self._all("Prefill", pb.PrefillRequest(batch=batch))
        return _step_answer(answer)

    async def decode(self, batch_ids: list[int], extensions: dict[int, list[int]], order: DecodeOrder) -> StepAnswer:
        """One token for every decoding request, and prompt chunks in the same forward."""
        message = pb.DecodeRequest(
            batches=[pb.CachedBatch(id=i) for i in batch_ids],
            extensions=[pb.BlockExtension(request_id=r, blocks=b) for r, b in extensions.items()],
            prefill=[_request_pb(i) for i in order.chunks],
            drop=order.drop,
            step_id=order.step_id,
            after_step_id=order.after_step_id,
            guesses=[pb.Guesses(request_id=r, tokens=g.tokens, draft=g.drafted) for r, g in order.guesses.items()],
        )
        return _step_answer(await self._all("Decode", message))

    async def filter(self, batch_id: int, keep: list[int]) -> None:
        await self._all("FilterBatch", pb.FilterBatchRequest(batch_id=batch_id, request_ids=keep))

    async def clear(self, batch_id: int | None = None) -> None:
        message = pb.ClearCacheRequest() if batch_id is None else pb.ClearCacheRequest(id=batch_id)
        await self._all("ClearCache", message)


_CHANNEL_OPTIONS: list[tuple[str, object]] = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    *RECONNECT_OPTIONS,
]


def _request_pb(item: PrefillItem) -> pb.Request:
    r = item.request
    return pb.Request(
        id=r.id,
        input_ids=r.token_ids,
        cache_len=item.cache_len,
        chunk_len=item.chunk_len,
        blocks=r.blocks,
        parameters=sampling_params.to_pb(r.sampling),
        sampled_before=len(r.generated),
        # Prompt tokens still unscored (a recomputation after they were all scored needs none).
        score_inputs=r.prompt_logprobs and len(r.prompt_scores) < len(r.prompt_ids) - 1,
        pooling=r.pooling,  # type: ignore[arg-type]
        adapter=r.adapter,
    )


def _step_answer(answer) -> StepAnswer:  # type: ignore[no-untyped-def]
    generations = [
        ShardGeneration(
            g.request_id,
            g.token_id,
            g.logprob,
            tuple((t.token_id, t.logprob) for t in g.top_tokens) if g.top_tokens else (),
        )
        for g in answer.generations
    ]
    scores = [
        ShardInputScores(
            x.request_id,
            x.first_position,
            list(x.logprobs),
            list(x.ranks),
            [tuple((t.token_id, t.logprob) for t in top.tokens) for top in x.top],
        )
        for x in answer.input_scores
    ]
    embeddings = [(e.request_id, list(e.values)) for e in answer.embeddings]
    return StepAnswer(
        generations, list(answer.batch.request_ids), answer.forward_ns, answer.decode_ns, scores, embeddings
    )
