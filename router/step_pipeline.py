"""Sending planned steps to the shards and taking their answers in, one step ahead where it can.

While step N computes, step N+1 (a pure decode of the same requests) can
already be queued at the shards, so they go from one forward to the next
without waiting for the answer to travel to the router and the next call back.
The shards run steps in the order of their step ids: each call names the step
it follows. This module owns that order, the shard batch's membership (which
request ids the shards hold in batch ``batch_id``) and the timing of the step
sent ahead; what goes into a step is ``router.planner``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Span

from router.observer import SchedulerObserver
from router.planner import StepPlan
from router.shard_client import DecodeOrder, PrefillItem, ShardClient, StepAnswer
from router.speculation import Guesses

#: How long before the step in flight is expected to end the step after it is sent: the time
#: to plan it and for the call to reach the shard's model thread, and a share of the step for
#: late wake-ups and variation (measurements: docs/performance.md, "Steps sent ahead").
SEND_AHEAD_S = 0.005
SEND_AHEAD_SHARE = 0.2
#: Steps shorter than this are sent ahead at once: waiting costs the router a wake-up in the
#: middle of the shards' compute (on a small CPU, a stalled compute thread), and arrivals into
#: so short a step wait little anyway.
LATE_SEND_MIN_STEP_S = 0.02


@dataclass
class SentStep:
    """A step call sent to the shards whose answer the router has not taken in yet."""

    method: str
    answer: asyncio.Future[StepAnswer]
    chunks: list[PrefillItem]
    span: Span
    sent_at: float
    step_id: int
    #: Speculative guesses it carries, per request id.
    guesses: dict[int, Guesses] = field(default_factory=dict)

    @property
    def is_pure_decode(self) -> bool:
        return self.method == "decode" and not self.chunks


class StepPipeline:
    def __init__(self, shards: ShardClient, observer: SchedulerObserver):
        self.shards = shards
        self.observer = observer
        self.batch_id = 1
        #: Request ids the shards hold in ``batch_id``, as of the last call sent.
        self.members: list[int] = []
        #: The step whose answer is awaited, if any.
        self.sent: SentStep | None = None
        #: The kind of shard call last sent ("prefill" or "decode"), for the failure counter.
        self.method = "decode"
        # Step numbers for the shards' ordering of pipelined calls: unique across router
        # restarts facing the same shard process, hence a random start.
        self._step_ids = itertools.count(random.getrandbits(48) + 1)
        self._last_answered = 0.0
        #: Recent time of a decode step without prompt chunks (shard forward + sampling), seconds.
        self._decode_s: float | None = None

    async def send(self, plan: StepPlan, after: SentStep | None = None) -> None:
        """Starts the shard call of ``plan`` (``plan.method`` is set); ``after``: the step in flight it follows."""
        assert plan.method is not None
        step_id = next(self._step_ids)
        if plan.method == "decode":
            stay = {r.id for r in plan.requests}
            drop = [rid for rid in self.members if rid not in stay]
            order = DecodeOrder(plan.chunks, drop, step_id, after.step_id if after is not None else 0, plan.guesses)
            call = self.shards.decode([self.batch_id], plan.extensions, order)
        else:
            assert after is None, "a Prefill may not overtake the step in flight"
            drop = []
            call = self.shards.prefill(self.batch_id, plan.chunks)
        self.method = plan.method
        span = self.observer.step_span(plan.method, plan.requests)
        dropped = set(drop)
        members = [rid for rid in self.members if rid not in dropped]
        known = set(members)
        self.members = members + [i.request.id for i in plan.chunks if i.request.id not in known]
        # The span is current while the call's task starts, so the shards' spans join its trace.
        with trace.use_span(span, end_on_exit=False):
            answer = asyncio.ensure_future(call)
        self.sent = SentStep(plan.method, answer, plan.chunks, span, time.perf_counter(), step_id, plan.guesses)

    async def answer_of(self, step: SentStep) -> StepAnswer:
        """Waits for ``step``'s answer; the step is no longer in flight after this, answered or failed."""
        try:
            answer = await step.answer
        finally:
            step.span.end()
            if self.sent is step:
                self.sent = None
        # A step sent ahead was sent while its predecessor ran: its time starts when that one was answered.
        self.observer.step_answered(step.method, max(step.sent_at, self._last_answered), answer, step.chunks)
        self._last_answered = time.perf_counter()
        if step.is_pure_decode:
            took = (answer.forward_ns + answer.decode_ns) / 1e9
            self._decode_s = took if self._decode_s is None else self._decode_s + 0.25 * (took - self._decode_s)
        if self.sent is None:  # else the step in flight already changed the batch
            self.members = answer.request_ids
        return answer

    async def abandon(self) -> None:
        """After a failed step: waits out the call still in flight (its answer is void)."""
        step, self.sent = self.sent, None
        if step is None:
            return
        step.span.end()
        with contextlib.suppress(Exception):  # the failure being handled is the one that counts
            await step.answer

    async def still_computing(self, step: SentStep) -> bool:
        """Waits until shortly before ``step`` is expected to end; False if its answer came first.

        The step sent ahead is planned as late as still keeps the shards busy, so
        that requests arriving meanwhile join it rather than the step after it (a
        step sent at once would make every arrival wait one step longer). The
        expected end: the predecessor's answer (``step`` started about then) plus
        the recent decode step time; the lead (SEND_AHEAD_S and SEND_AHEAD_SHARE of the
        step) covers sending.
        """
        if self._decode_s is None or self._decode_s < LATE_SEND_MIN_STEP_S:
            return True
        lead_s = SEND_AHEAD_S + SEND_AHEAD_SHARE * self._decode_s
        wait_s = self._last_answered + self._decode_s - lead_s - time.perf_counter()
        if wait_s > 0:
            await asyncio.wait([step.answer], timeout=wait_s)
        return not step.answer.done()

    async def keep_only(self, request_ids: set[int]) -> None:
        """Drops from the shard batch every member not in ``request_ids`` (finished, cancelled,
        preempted). Requests admitted in a step join the batch through the step's call itself."""
        keep = [rid for rid in self.members if rid in request_ids]
        if keep != self.members:
            if keep:
                await self.shards.filter(self.batch_id, keep)
            else:
                await self.shards.clear(self.batch_id)
        self.members = keep

    def new_batch(self) -> None:
        """The shards hold nothing of the old batch (restarted, or cleared after a failure)."""
        self.members = []
        self.batch_id += 1

    def cancel(self) -> None:
        if self.sent is not None:
            self.sent.answer.cancel()
