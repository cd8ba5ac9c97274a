"""The shard's gRPC servicer: protobuf in, engine call on the model thread, protobuf out."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import grpc

from common import sampling_params
from common.grpc_errors import ErrorInterceptor
from common.grpc_security import TlsConfig
from common.tracing import Tracing
from protos import shard_pb2 as pb
from protos import shard_pb2_grpc as pb_grpc
from shard.config import ShardConfig
from shard.runtime.engine import Engine, NewRequest, StepResult
from shard.runtime.errors import InvalidRequest
from shard.runtime.pooling import Pooling
from shard.runtime.step_order import StepOrder

T = TypeVar("T")


def request_from_pb(r: pb.Request) -> NewRequest:
    params = sampling_params.from_pb(r.parameters)
    wrong = params.problems()
    if wrong:
        raise InvalidRequest(f"request {r.id}: " + "; ".join(wrong))
    return NewRequest(
        request_id=r.id,
        input_ids=list(r.input_ids),
        cache_len=r.cache_len,
        chunk_len=r.chunk_len,
        blocks=list(r.blocks),
        params=params,
        sampled_before=r.sampled_before,
        score_inputs=r.score_inputs,
        pooling=Pooling(r.pooling),
        adapter=r.adapter,
    )


def cached_batch_pb(result: StepResult) -> pb.CachedBatch:
    return pb.CachedBatch(
        id=result.batch_id,
        request_ids=result.request_ids,
        size=len(result.request_ids),
        current_tokens=result.current_tokens,
    )


def _top_pb(top: list[tuple[int, float]]) -> list[pb.TopToken]:
    return [pb.TopToken(token_id=t, logprob=lp) for t, lp in top]


def generations_pb(result: StepResult) -> list[pb.Generation]:
    return [
        pb.Generation(
            request_id=g.request_id,
            token_id=g.token_id,
            logprob=g.logprob,
            top_tokens=_top_pb(g.top),
        )
        for g in result.generations
    ]


def input_scores_pb(result: StepResult) -> list[pb.InputScores]:
    return [
        pb.InputScores(
            request_id=x.request_id,
            first_position=x.first_position,
            logprobs=x.logprobs,
            ranks=x.ranks,
            top=[pb.TopTokens(tokens=_top_pb(top)) for top in x.top],
        )
        for x in result.input_scores
    ]


class ShardServicer(pb_grpc.ShardServiceServicer):
    def __init__(
        self,
        engine: Engine,
        config: ShardConfig,
        model_name: str,
        architecture: str,
        tracing: Tracing | None = None,
        model_thread: concurrent.futures.ThreadPoolExecutor | None = None,
    ):
        self.engine = engine
        self.tracer = (tracing or Tracing()).tracer("switchyard.shard")
        self.config = config
        self.model_name = model_name
        self.architecture = architecture
        #: The draft model serving Guesses.draft, as DRAFT_MODEL_ID named it ("" for none).
        self.draft_model_name = (config.draft_model_id or "") if getattr(engine, "drafter", None) else ""
        #: Tells the router this process from the one before it at the same address.
        self.instance_id = uuid.uuid4().hex
        # torch work runs on one thread so the event loop keeps answering Health; one thread
        # also serialises steps, which share the batch store. The thread that loaded the
        # model, where one did (shard.__main__.serve says why it must be the same).
        self._model_thread = model_thread or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self._order = StepOrder()

    def _on_model_thread(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queues ``fn`` on the model thread at once (the queue's order is the run order)."""
        return asyncio.get_running_loop().run_in_executor(self._model_thread, fn)

    async def Info(self, request, context):
        e = self.engine
        return pb.InfoResponse(
            model_id=self.model_name,
            dtype=str(e.dtype).removeprefix("torch."),
            device=str(e.device),
            vocab_size=e.vocab_size,
            max_position_embeddings=e.max_positions,
            block_size=e.block_size,
            world_size=self.config.world_size,
            architecture=self.architecture,
            draft_model_id=self.draft_model_name,
        )

    async def Health(self, request, context):
        return pb.HealthResponse(warm=self.engine.warm, instance_id=self.instance_id)

    async def ServiceDiscovery(self, request, context):
        urls = [self.config.address_of(r) for r in range(self.config.world_size)]
        return pb.ServiceDiscoveryResponse(urls=urls)

    async def Warmup(self, request, context):
        num_blocks = await self._on_model_thread(
            lambda: self.engine.warmup(
                request.max_batch_prefill_tokens,
                request.max_batch_size,
                request.max_batch_total_tokens,
            )
        )
        bs = self.engine.block_size
        return pb.WarmupResponse(num_blocks=num_blocks, block_size=bs, max_supported_total_tokens=num_blocks * bs)

    async def Prefill(self, request, context):
        started = time.perf_counter_ns()
        requests = [request_from_pb(r) for r in request.batch.requests]
        with self.tracer.start_as_current_span("shard.prefill") as span:
            result = await self._on_model_thread(lambda: self.engine.prefill(request.batch.id, requests))
            span.set_attribute("switchyard.requests", len(requests))
            span.set_attribute("switchyard.tokens", sum(r.chunk_len for r in requests))
            span.set_attribute("switchyard.forward_ns", result.forward_ns)
        return pb.PrefillResponse(
            generations=generations_pb(result),
            input_scores=input_scores_pb(result),
            embeddings=[pb.Embedding(request_id=r, values=v) for r, v in result.embeddings],
            batch=cached_batch_pb(result),
            forward_ns=result.forward_ns,
            decode_ns=result.decode_ns,
            total_ns=time.perf_counter_ns() - started,
        )

    async def Decode(self, request, context):
        started = time.perf_counter_ns()
        try:
            await self._order.after(request.after_step_id)
            batch_ids = [b.id for b in request.batches]
            extensions = {x.request_id: list(x.blocks) for x in request.extensions}
            chunks = [request_from_pb(r) for r in request.prefill]
            drop = list(request.drop)
            guesses = {g.request_id: list(g.tokens) for g in request.guesses if g.tokens}
            drafts = {g.request_id: g.draft for g in request.guesses if g.draft}
            # Handed to the model thread before anything awaits: the order gate's invariant.
            step = self._on_model_thread(
                lambda: self.engine.decode(batch_ids, extensions, chunks, drop, guesses, drafts)
            )
        finally:
            self._order.handed(request.step_id)  # a call that failed here must not hold up its follower
        with self.tracer.start_as_current_span("shard.decode") as span:
            result = await step
            span.set_attribute("switchyard.requests", len(result.generations))
            span.set_attribute("switchyard.prompt_tokens", sum(r.chunk_len for r in chunks))
            span.set_attribute("switchyard.forward_ns", result.forward_ns)
        return pb.DecodeResponse(
            generations=generations_pb(result),
            input_scores=input_scores_pb(result),
            embeddings=[pb.Embedding(request_id=r, values=v) for r, v in result.embeddings],
            batch=cached_batch_pb(result),
            forward_ns=result.forward_ns,
            decode_ns=result.decode_ns,
            total_ns=time.perf_counter_ns() - started,
        )

    async def FilterBatch(self, request, context):
        keep = list(request.request_ids)
        result = await self._on_model_thread(lambda: self.engine.filter(request.batch_id, keep))
        return pb.FilterBatchResponse(batch=cached_batch_pb(result))

    async def ClearCache(self, request, context):
        batch_id = request.id if request.HasField("id") else None
        await self._on_model_thread(lambda: self.engine.clear(batch_id))
        return pb.ClearCacheResponse()

    async def LoadAdapter(self, request, context):
        name, path = request.name, request.path
        if not name or not path:
            raise InvalidRequest("LoadAdapter needs a name and a path")
        adapter = await self._on_model_thread(lambda: self.engine.load_adapter(name, path))
        return pb.LoadAdapterResponse(bytes=adapter.nbytes, rank=adapter.rank)

    async def UnloadAdapter(self, request, context):
        await self._on_model_thread(lambda: self.engine.unload_adapter(request.name))
        return pb.UnloadAdapterResponse()


def create_server(
    servicer: ShardServicer, address: str, tracing: Tracing | None = None, tls: TlsConfig | None = None
) -> grpc.aio.Server:
    tracing = tracing or Tracing()
    server = grpc.aio.server(
        # Tracing outermost: the span records the status the error interceptor chose.
        interceptors=[*tracing.grpc_server_interceptors(), ErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )
    pb_grpc.add_ShardServiceServicer_to_server(servicer, server)
    (tls or TlsConfig()).add_port(server, address)
    return server
