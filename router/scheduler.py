"""The continuous-batching loop: plan a step, send it, take its answer in, deliver the tokens.

One shard batch (``batch_id``) holds every admitted request. Each iteration
makes one shard call, one forward pass: the planner (``router.planner``) decides
what the step computes (prompt chunks and one token for each decoding request),
the step pipeline (``router.step_pipeline``) sends it, one step ahead where it
can, and takes its answer in; the emitter (``router.emitter``) turns each sampled
token into its caller's event; the observer (``router.observer``) counts and
traces all of it. When a shard process dies, every running request is requeued
once the restarted shard is warm again (``_recover``): its caller sees the stream
pause, never an error, unless the shard stays away longer than the recovery
timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable

import grpc
from opentelemetry import trace

from common.settings import ROUTER, default_of
from router.blocks import BlockAllocator
from router.config import Limits
from router.emitter import Emitter
from router.errors import ShardFailure, ShardsUnavailable
from router.metrics import RouterMetrics
from router.observer import SchedulerObserver
from router.planner import Planner, StepPlan
from router.recovery import ShardLink
from router.request import Phase, Request, StreamEvent
from router.shard_client import ShardGeneration, ShardInputScores
from router.speculation import Guesses, SpeculationPolicy
from router.step_pipeline import SentStep, StepPipeline
from router.tokenization import Tokenizer

log = logging.getLogger(__name__)

#: How often an idle router checks that its shards are still the ones it warmed up.
IDLE_CHECK_INTERVAL_S = 1.0


class Scheduler:
    def __init__(
        self,
        link: ShardLink,
        allocator: BlockAllocator,
        limits: Limits,
        tokenizer: Tokenizer,
        metrics: RouterMetrics | None = None,
        tracer: trace.Tracer | None = None,
        recovery_timeout_s: float = default_of(ROUTER, "shard_recovery_timeout"),
        pipeline: bool = True,
        speculation: SpeculationPolicy | None = None,
    ):
        self.link = link
        self.shards = link.shards
        self.limits = limits
        self.observer = SchedulerObserver(metrics or RouterMetrics(), tracer or trace.NoOpTracer())
        self.planner = Planner(allocator, limits, speculation)
        self.steps = StepPipeline(link.shards, self.observer)
        self.emitter = Emitter(tokenizer, limits.max_total_tokens)
        #: Send step N+1 before step N's answer is in where possible (PIPELINE_STEPS).
        self.pipeline = pipeline
        #: How long a request waits for a restarted shard before it ends with an error.
        self.recovery_timeout_s = recovery_timeout_s
        #: Why the shards cannot serve right now (a restart being recovered), or None.
        self.unavailable: str | None = None
        #: Set by a ReplicaSet: takes the requests of this replica while it recovers (True if it did).
        self.hand_off: Callable[[list[Request]], bool] | None = None
        self._wake = asyncio.Event()
        self.observer.batch(self.planner)  # the KV gauges are right before the first request

    @property
    def metrics(self) -> RouterMetrics:
        return self.observer.metrics

    @metrics.setter
    def metrics(self, metrics: RouterMetrics) -> None:
        self.observer.metrics = metrics

    @property
    def waiting(self) -> deque[Request]:
        return self.planner.waiting

    @property
    def active(self) -> list[Request]:
        return self.planner.active

    @property
    def allocator(self) -> BlockAllocator:
        return self.planner.allocator

    # --- called by the API ------------------------------------------------------

    def submit(self, request: Request) -> None:
        self.observer.arrived(request)
        self.planner.enqueue(request)
        self._wake.set()

    def resume(self, request: Request) -> None:
        """A request moved here from a replica that failed: first in line, its tokens recomputed."""
        self.planner.enqueue_first(request)
        self._wake.set()

    @property
    def open_requests(self) -> int:
        """Requests queued or running."""
        return len(self.planner.waiting) + len(self.planner.active)

    @property
    def load(self) -> float:
        return self.planner.load

    def cancel(self, request: Request) -> None:
        """The caller went away: forget a queued request now, a running one at the next step."""
        request.cancelled = True
        if request.phase is Phase.WAITING and request in self.planner.waiting:
            self._finish(request, "cancelled")
        self._wake.set()

    async def check_shards(self) -> None:
        """For Health: raises ShardsUnavailable while the shards cannot serve (and starts recovering them)."""
        if self.unavailable is None:
            why = await self.link.problem()
            if why is None:
                return
            self.unavailable = why  # the loop notices it at its next idle check or failed step
        raise ShardsUnavailable(self.unavailable)

    # --- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                if self.steps.sent is None and not self.open_requests:
                    await self._idle()
                    continue
                try:
                    await self._advance()
                except Exception as exc:
                    await self.steps.abandon()
                    self.observer.step_failed(self.steps.method)
                    why = await self.link.problem()
                    if why is None:  # the shard is fine: a fault of this step, fail its requests
                        await self._fail_active(exc)
                    else:
                        log.warning("shard step failed (%s): %s", why, _one_line(exc))
                        await self._recover(why)
        finally:
            self.steps.cancel()

    async def _advance(self) -> None:
        """Sends a step or takes in an answer; where it can, the next step goes out first."""
        sent = self.steps.sent
        if sent is None:
            if await self._send_next():
                return
            # Nothing to compute: the plan may have just dropped the last (cancelled) request,
            # so the shard's batch and the gauges are brought up to date below.
            await asyncio.sleep(0)  # let the callers run
        else:
            if self.pipeline and self._can_send_ahead_of(sent) and await self._still_computing(sent):
                await self._send_next(after=sent)
            await self._take_answer(sent)
            # The answer of the step now in flight may already be here, and awaiting it would
            # not let the streams run: yield, so each stream takes this step's token on its own
            # rather than merged with the next one (merging is for consumers that fall behind).
            await asyncio.sleep(0)
        if not self.active and self.steps.sent is None:
            await self.steps.keep_only(set())  # idle: the shard holds nothing
        self.observer.batch(self.planner)

    async def _idle(self) -> None:
        """Sleeps until work arrives, checking meanwhile that the shards were not restarted."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), IDLE_CHECK_INTERVAL_S)
        except TimeoutError:
            why = await self.link.problem()
            if why is not None:
                await self._recover(why)

    async def step(self) -> None:
        """One shard call and one forward (prompt chunks and decode tokens together), its
        answer taken in before this returns."""
        if self.steps.sent is not None:
            await self._take_answer(self.steps.sent)
        if await self._send_next():
            assert self.steps.sent is not None
            await self._take_answer(self.steps.sent)
        if not self.active:
            await self.steps.keep_only(set())  # idle: the shard holds nothing (else the next step's call says so)
        self.observer.batch(self.planner)

    # --- one step -----------------------------------------------------------------

    async def _send_next(self, after: SentStep | None = None) -> bool:
        """Plans the next step and sends it; False when there is nothing to compute.

        ``after``: the decode step in flight it follows (see ``_can_send_ahead_of``)."""
        plan = self.planner.plan(ahead=after is not None)
        self._observe_plan(plan)
        if plan.method is None:
            return False
        if plan.method == "prefill":
            await self.steps.keep_only({r.id for r in self.active})
        await self.steps.send(plan, after)
        return True

    def _observe_plan(self, plan: StepPlan) -> None:
        for r in plan.cancelled:
            self.observer.finished(r, "cancelled")
        p = self.planner
        self.metrics.lora_requests(
            frozenset(r.adapter for r in p.active if r.adapter), frozenset(r.adapter for r in p.waiting if r.adapter)
        )
        self.observer.planned(plan, len(self.active))

    def _can_send_ahead_of(self, sent: SentStep) -> bool:
        return self.planner.can_plan_ahead(sent.method, bool(sent.chunks), bool(sent.guesses))

    async def _still_computing(self, sent: SentStep) -> bool:
        """Whether, shortly before ``sent`` is expected to end, it still computes and the next
        step can still go ahead of its answer."""
        return await self.steps.still_computing(sent) and self._can_send_ahead_of(sent)

    async def _take_answer(self, sent: SentStep) -> None:
        """Takes in a step's answer: computed chunks, then each token to its caller."""
        answer = await self.steps.answer_of(sent)
        self.planner.chunks_computed(sent.chunks)
        started = time.perf_counter()
        if answer.input_scores:
            self._take_scores(answer.input_scores)
        if answer.embeddings:
            self._deliver_embeddings(answer.embeddings)
        if sent.guesses:
            self._count_guesses(sent.guesses, answer.generations)
        self._deliver(answer.generations)
        self.observer.tokens_delivered(len(answer.generations), sent.method, started)

    def _take_scores(self, scores: list[ShardInputScores]) -> None:
        by_id = {r.id: r for r in self.active}
        for x in scores:
            if (r := by_id.get(x.request_id)) is not None and r.prompt_logprobs:
                self.emitter.prompt_scores(r, x)

    def _count_guesses(self, guesses: dict[int, Guesses], generations: list[ShardGeneration]) -> None:
        """How many of each request's guesses the shards kept: its tokens in the answer, less the draw."""
        kept: dict[int, int] = {}
        for g in generations:
            kept[g.request_id] = kept.get(g.request_id, 0) + 1
        by_id = {r.id: r for r in self.active}
        for request_id, proposed in guesses.items():
            accepted = max(0, kept.get(request_id, 1) - 1)
            if (r := by_id.get(request_id)) is not None and self.planner.speculation is not None:
                self.planner.speculation.verified(r, len(proposed), accepted)
            self.observer.speculated(len(proposed), accepted)

    def _deliver_embeddings(self, embeddings: list[tuple[int, list[float]]]) -> None:
        """An embedding request is done when its vector comes: one event, and it leaves the batch."""
        by_id = {r.id: r for r in self.active}
        for request_id, vector in embeddings:
            r = by_id.get(request_id)
            if r is None or r.phase is Phase.FINISHED:
                continue
            counts = (len(r.prompt_ids), 0)
            r.events.put_nowait(StreamEvent("", (), "stop", *counts, cached_tokens=r.cached_tokens, embedding=vector))
            self._finish(r, "stop")

    def _deliver(self, generations: list[ShardGeneration]) -> None:
        """Each generated token to its request's stream; requests that are done finish."""
        by_id = {r.id: r for r in self.active}
        now = time.monotonic()
        for g in generations:
            r = by_id.get(g.request_id)
            if r is None or r.phase is Phase.FINISHED:
                continue  # dropped while the step ran, or a token past a stop found one step late
            self.planner.token_computed(r, g.token_id)
            self.observer.token(r, now)
            event, finish = self.emitter.event(r, g)
            r.events.put_nowait(event)
            if finish is not None:
                self._finish(r, finish)

    def _finish(self, r: Request, outcome: str) -> None:
        self.planner.retire(r)
        self.observer.finished(r, outcome)

    # --- failures and shard restarts ------------------------------------------------

    async def _recover(self, why: str) -> None:
        """Warms the restarted shards and queues every running request for recomputation.

        The shards' KV is gone, so the allocator starts empty (its prefix cache
        described that KV) and each running request goes back to the head of the
        queue, oldest first, keeping its generated tokens. Requests that wait longer
        than the recovery timeout meanwhile end with an error.
        """
        self.unavailable = why
        self.observer.shards_lost()
        started = time.monotonic()
        log.warning("%s: recomputing %d running requests once it is warm", why, len(self.active))
        self.planner.requeue_running()
        self.steps.new_batch()
        waiting = self.planner.waiting
        if waiting and self.hand_off is not None and self.hand_off(list(waiting)):
            log.warning("%d requests moved to the other replicas", len(waiting))
            waiting.clear()

        def check_queue() -> None:
            self._expire_waiting(started)
            self.observer.batch(self.planner)

        warm = await self.link.restore_watching(check_queue)
        self.planner.reset(warm.num_blocks, warm.block_size)
        for r in [r for r in self.planner.waiting if r.cancelled]:
            self._finish(r, "cancelled")
        self.unavailable = None
        self.observer.shards_back()
        log.info("shards warm again after %.1fs; resuming %d requests", time.monotonic() - started, len(waiting))
        self.observer.batch(self.planner)

    def _expire_waiting(self, recovery_started: float) -> None:
        now = time.monotonic()
        for r in list(self.planner.waiting):
            if now - max(r.arrived_at, recovery_started) > self.recovery_timeout_s:
                error = ShardsUnavailable(f"the model server did not recover within {self.recovery_timeout_s:.0f}s")
                r.events.put_nowait(StreamEvent("", (), error=error))
                self._finish(r, "error")

    async def _fail_active(self, exc: Exception) -> None:
        fault_id = uuid.uuid4().hex[:12]
        log.error("fault %s: shard step failed, failing %d requests: %s", fault_id, len(self.active), _one_line(exc))
        error = ShardFailure(f"the model failed to compute this request (fault id {fault_id})")
        for r in list(self.active):
            r.events.put_nowait(StreamEvent("", (), error=error))
            self._finish(r, "error")
        self.steps.new_batch()
        try:
            await self.shards.clear()
        except Exception as clear_exc:
            log.error("could not clear the shards after a failure: %s", clear_exc)
        self.observer.batch(self.planner)


def _one_line(exc: Exception) -> str:
    """A shard call's failure for the log: gRPC's status and details, not its multi-line repr."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
