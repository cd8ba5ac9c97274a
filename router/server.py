"""The router's public gRPC API (router.proto)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from common.grpc_errors import ErrorInterceptor, ServiceError
from common.grpc_security import ApiKeyInterceptor, TlsConfig
from common.tracing import Tracing
from protos import router_pb2 as pb
from protos import router_pb2_grpc as pb_grpc
from router.adapters import ServedAdapter
from router.errors import Overloaded, ShardsUnavailable, ShuttingDown, ValidationError
from router.replicas import Replica, ReplicaSet
from router.request import Request, StreamEvent
from router.scheduler import Scheduler
from router.tools import tool_calls_pb
from router.validation import Validator

log = logging.getLogger(__name__)

VERSION = "0.1.0"
#: How long an unload waits for the adapter's running requests to finish.
ADAPTER_UNLOAD_TIMEOUT_S = 600.0

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
}


@dataclass(frozen=True)
class ServedModel:
    model_id: str
    dtype: str
    device: str
    num_shard: int
    max_batch_total_tokens: int


@dataclass(frozen=True)
class Serving:
    """What the API needs once the shards are warm."""

    replicas: ReplicaSet
    validator: Validator
    model: ServedModel

    @classmethod
    def of_scheduler(cls, scheduler: Scheduler, validator: Validator, model: ServedModel) -> Serving:
        """One replica."""
        return cls(ReplicaSet([Replica("0", scheduler)]), validator, model)


class RouterServicer(pb_grpc.RouterServicer):
    """The public API. It listens from the router's first second: until ``start``, every call
    (Health included) is UNAVAILABLE saying which phase the start is in."""

    def __init__(
        self,
        #: Per replica: with N replicas, N times as many in total (each replica also holds to it).
        max_concurrent_requests: int,
        tracer: trace.Tracer | None = None,
        serving: Serving | None = None,
    ):
        self.tracer = tracer or trace.NoOpTracer()
        #: Set on SIGTERM: new requests are refused, those in flight finish.
        self.draining = False
        #: What the start is doing, for Health until ``start``.
        self.phase = "starting"
        self.serving = serving
        self.max_concurrent = max_concurrent_requests
        self.in_flight = 0
        self._ids = itertools.count(1)

    def start(self, serving: Serving) -> None:
        self.serving = serving

    def _ready(self) -> Serving:
        if self.serving is None:
            raise ShardsUnavailable(f"starting: {self.phase}")
        return self.serving

    async def _events(self, message: Any, embed: bool = False) -> AsyncIterator[StreamEvent]:
        """Admits a request (a GenerateRequest, or an EmbedRequest when ``embed``) and yields its
        events; a caller that goes away cancels it."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica or after the restart")
        serving = self._ready()
        metrics = serving.replicas.front_metrics
        # MAX_CONCURRENT_REQUESTS is per replica (as per TGI router); in total, that many per replica.
        limit = self.max_concurrent * len(serving.replicas.replicas)
        if self.in_flight >= limit:
            metrics.request_refused("overloaded")
            raise Overloaded(f"the server is overloaded: {limit} requests are in flight; retry later")
        started = time.perf_counter()
        try:
            with self.tracer.start_as_current_span("validate"):
                admit = serving.validator.embed_request if embed else serving.validator.request
                request: Request = admit(next(self._ids), message)
        except ValidationError:
            metrics.request_refused("validation")
            raise
        metrics.validation_duration.observe(time.perf_counter() - started)
        request.trace_context = otel_context.get_current()
        self.in_flight += 1
        finished = False
        try:
            try:
                serving.replicas.submit(request)
            except Overloaded:
                metrics.request_refused("overloaded")
                raise
            while True:
                event = _coalesce(await request.events.get(), request.events)
                if event.error is not None:
                    finished = True
                    raise event.error
                finished = event.finish_reason is not None
                yield event
                if finished:
                    return
        finally:
            self.in_flight -= 1
            if not finished:
                serving.replicas.cancel(request)
            serving.replicas.finished(request)

    async def drain(self, timeout_s: float) -> None:
        """Refuses new requests and waits (up to ``timeout_s``) for those in flight to finish."""
        self.draining = True
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def Generate(self, request, context):
        text: list[str] = []
        reasoning: list[str] = []
        tokens: list[pb.Token] = []
        prompt: list[pb.Token] = []
        async for event in self._events(request):
            text.append(event.text)
            reasoning.append(event.reasoning)
            prompt.extend(_token_pb(t) for t in event.prompt)
            tokens.extend(_token_pb(t) for t in event.tokens)
            if event.finish_reason:
                return pb.GenerateResponse(
                    text="".join(text),
                    finish_reason=FINISH_REASONS[event.finish_reason],
                    usage=pb.Usage(
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        cached_tokens=event.cached_tokens,
                        reasoning_tokens=event.reasoning_tokens,
                    ),
                    tokens=tokens,
                    tool_calls=tool_calls_pb(event.tool_calls),
                    reasoning="".join(reasoning),
                    prompt_tokens=prompt,
                )
        raise ServiceError("generation ended without a finish event")

    async def GenerateStream(self, request, context):
        async for event in self._events(request):
            message = pb.GenerateStreamResponse(
                text=event.text,
                tokens=[_token_pb(t) for t in event.tokens],
                reasoning=event.reasoning,
                prompt_tokens=[_token_pb(t) for t in event.prompt],
            )
            if event.finish_reason:
                message.finish_reason = FINISH_REASONS[event.finish_reason]
                message.usage.prompt_tokens = event.prompt_tokens
                message.usage.completion_tokens = event.completion_tokens
                message.usage.cached_tokens = event.cached_tokens
                message.usage.reasoning_tokens = event.reasoning_tokens
                message.tool_calls.extend(tool_calls_pb(event.tool_calls))
            yield message

    async def Embed(self, request, context):
        config = self._ready().validator.embedding
        normalize = request.normalize if request.HasField("normalize") else None
        async for event in self._events(request, embed=True):
            if event.embedding is not None:
                vector = config.finish(event.embedding, request.dimensions, normalize)
                return pb.EmbedResponse(
                    embedding=vector, prompt_tokens=event.prompt_tokens, cached_tokens=event.cached_tokens
                )
        raise ServiceError("the embedding ended without its vector")

    async def Tokenize(self, request, context):
        validator = self._ready().validator
        ids, text = validator.prompt_ids(request)
        # A raw prompt is encoded with the tokenizer's special tokens (BOS...), a rendered chat without.
        spans = validator.tokenizer.offsets(text, add_special_tokens=request.WhichOneof("input") == "prompt")
        offsets = [pb.TokenOffset(start=a, stop=b) for a, b in spans] if len(spans) == len(ids) else []
        return pb.TokenizeResponse(ids=ids, text=text, offsets=offsets)

    async def Detokenize(self, request, context):
        validator = self._ready().validator
        ids = list(request.ids)
        vocab = validator.vocab_size
        if ids and max(ids) >= vocab:
            raise ServiceError(f"token ids must be below {vocab}", "ids", grpc.StatusCode.INVALID_ARGUMENT)
        return pb.DetokenizeResponse(text=validator.tokenizer.decode(ids, request.skip_special_tokens))

    async def Info(self, request, context):
        serving = self._ready()
        validator, model, limits = serving.validator, serving.model, serving.validator.limits
        return pb.InfoResponse(
            model_id=model.model_id,
            dtype=model.dtype,
            device=model.device,
            num_shard=model.num_shard,
            max_input_tokens=limits.max_input_tokens,
            max_total_tokens=limits.max_total_tokens,
            max_concurrent_requests=self.max_concurrent,
            max_batch_size=limits.max_batch_size,
            max_batch_total_tokens=model.max_batch_total_tokens,
            has_chat_template=validator.tokenizer.has_chat_template,
            version=VERSION,
            max_top_n_tokens=validator.max_top_n_tokens,
            max_stop_sequences=validator.max_stop_sequences,
        )

    async def Health(self, request, context):
        if self.draining:
            raise ShuttingDown("shutting down")
        await self._ready().replicas.check_shards()
        return pb.HealthResponse()

    async def Metrics(self, request, context):
        return pb.MetricsResponse(text=self._ready().replicas.exposition().decode())

    async def ListAdapters(self, request, context):
        served = self._ready().validator.adapters
        adapters = [a for name, a in served.adapters.items() if name not in served.unloading]
        return pb.ListAdaptersResponse(adapters=[_adapter_pb(a) for a in adapters])

    async def LoadAdapter(self, request, context):
        serving = self._ready()
        served = await serving.validator.adapters.load(request.name, request.path, serving.replicas.shard_clients)
        return _adapter_pb(served)

    async def UnloadAdapter(self, request, context):
        serving = self._ready()
        replicas = serving.replicas
        await serving.validator.adapters.unload(
            request.name, replicas.shard_clients, replicas.uses_adapter, ADAPTER_UNLOAD_TIMEOUT_S
        )
        return pb.UnloadAdapterResponse()


def _coalesce(first: StreamEvent, queue: asyncio.Queue[StreamEvent]) -> StreamEvent:
    """Merges events already queued behind ``first`` into one.

    A caller that reads slower than tokens arrive gets fewer, larger messages,
    so per-message cost never limits throughput. An error is never merged.
    """
    if first.error is not None or first.finish_reason is not None or queue.empty():
        return first
    text, tokens, last = [first.text], list(first.tokens), first
    reasoning = [first.reasoning]
    while not queue.empty():
        nxt = queue._queue[0]  # type: ignore[attr-defined]  # peek: errors must stay separate
        if nxt.error is not None:
            break
        last = queue.get_nowait()
        text.append(last.text)
        reasoning.append(last.reasoning)
        tokens.extend(last.tokens)
        if last.finish_reason is not None:
            break
    return StreamEvent(
        "".join(text),
        tuple(tokens),
        last.finish_reason,
        last.prompt_tokens,
        last.completion_tokens,
        tool_calls=last.tool_calls,
        cached_tokens=last.cached_tokens,
        reasoning="".join(reasoning),
        prompt=first.prompt,
        embedding=last.embedding,
        reasoning_tokens=last.reasoning_tokens,
    )


def _adapter_pb(a: ServedAdapter) -> pb.Adapter:
    return pb.Adapter(name=a.name, path=a.path, rank=a.rank)


def _token_pb(t) -> pb.Token:  # type: ignore[no-untyped-def]
    # Runs for every token: set the logprob fields only for requests that asked for them.
    if not t.text and not t.top:
        return pb.Token(id=t.id, logprob=t.logprob, special=t.special)
    top = [pb.TopToken(id=i, logprob=lp, text=text) for i, lp, text in t.top]
    return pb.Token(id=t.id, logprob=t.logprob, special=t.special, text=t.text, top=top, rank=t.rank)


def create_server(
    servicer: RouterServicer,
    address: str,
    tracing: Tracing | None = None,
    tls: TlsConfig | None = None,
    api_key: str | None = None,
) -> grpc.aio.Server:
    tracing = tracing or Tracing()
    auth = [ApiKeyInterceptor(api_key)] if api_key else []
    server = grpc.aio.server(interceptors=[*tracing.grpc_server_interceptors(), *auth, ErrorInterceptor()])
    pb_grpc.add_RouterServicer_to_server(servicer, server)
    (tls or TlsConfig()).add_port(server, address)
    return server
