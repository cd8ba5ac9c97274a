"""The continuous-batching loop.

One shard batch (``batch_id``) holds every admitted request. Each iteration
makes one shard call, one forward pass: drop cancelled requests, plan the prompt
chunks the budgets admit (next chunks of long prompts first, then arrivals in
order, then preempted requests being recomputed), and send them along with one
token for every decoding request (Decode carrying prompt chunks; a plain Prefill
when nothing decodes). The prompt budget per step (MAX_BATCH_PREFILL_TOKENS)
bounds how long a step with a new prompt holds back the running streams. Requests
are served first come, first served: nobody overtakes the head of the queue. When
KV blocks run out mid-generation the youngest running request is preempted: it
returns to the head of the queue keeping its tokens, and is recomputed (mostly
from the prefix cache) when blocks free up. When a shard process dies, every
running request is treated the same way once the restarted shard is warm again
(``_recover``): its caller sees the stream pause, never an error, unless the
shard stays away longer than the recovery timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span

from router.blocks import NEW_CHAIN, BlockAllocator
from router.config import Limits
from router.errors import OutOfBlocks, ShardFailure, ShardsUnavailable
from router.metrics import RouterMetrics
from router.recovery import ShardLink
from router.request import Phase, Request, StreamEvent, TokenInfo
from router.shard_client import DecodeOrder, PrefillItem, ShardGeneration, StepAnswer
from router.tokenization import Tokenizer

log = logging.getLogger(__name__)


#: How often an idle router checks that its shards are still the ones it warmed up.
IDLE_CHECK_INTERVAL_S = 1.0
#: How long before the step in flight is expected to end the step after it is sent: the time
#: to plan it and for the call to reach the shard's model thread (measured on a 2-core CPU
#: under load: 1.5-2.5 ms, up to 4), and a share of the step for late wake-ups and variation.
SEND_AHEAD_S = 0.005
SEND_AHEAD_SHARE = 0.2
#: Steps shorter than this are sent ahead at once: waiting costs the router a wake-up in the
#: middle of the shards' compute (on a small CPU, a stalled compute thread), and arrivals into
#: so short a step wait little anyway.
LATE_SEND_MIN_STEP_S = 0.02
#: A decoding request that needs a block takes up to this many at once (no more than its length
#: limit can fill, and only while the cache keeps as many for every active request), so that its
#: KV lies in runs of contiguous blocks rather than one block between each of the other streams'.
#: Decode attention walks a sequence's blocks in order and the CPU's prefetchers lose the stream
#: at every jump: 64 sequences of 340 tokens, 30 layers (2-core AMD EPYC, bf16, huge pages):
#: 34.3 ms with the output's blocks handed out one at a time round the batch, 31.1 with runs of 4,
#: 28.4 with each sequence's blocks all contiguous; deeper software prefetching did not help.
#: The engine alone on the shared workload at 64 streams (benchmarks/engine_workload.py, which
#: takes blocks as this scheduler does), alternated in one process: 363.7 against 344.1 tok/s
#: (medians of 4 rounds, paired ratio 1.056). Blocks taken ahead are used or freed with the request.
DECODE_BLOCK_RUN = 4


def blocks_to_take(needed: int, fillable: int, spare: int) -> int:
    """How many blocks a decoding request takes when it needs ``needed`` more: a run of
    DECODE_BLOCK_RUN where its length limit can fill them (``fillable``: the blocks its last KV
    token needs beyond those it holds) and the cache keeps a run for every active request
    (``spare``: free blocks beyond those runs), else only ``needed``."""
    run = min(DECODE_BLOCK_RUN, fillable)
    return run if needed < run <= spare else needed


#: How long a request waits for a restarted shard before it ends with an error (SHARD_RECOVERY_TIMEOUT).
DEFAULT_RECOVERY_TIMEOUT_S = 60.0


class Scheduler:
    def __init__(
        self,
        link: ShardLink,
        allocator: BlockAllocator,
        limits: Limits,
        tokenizer: Tokenizer,
        metrics: RouterMetrics | None = None,
        tracer: trace.Tracer | None = None,
        recovery_timeout_s: float = DEFAULT_RECOVERY_TIMEOUT_S,
        pipeline: bool = True,
    ):
        self.tracer = tracer or trace.NoOpTracer()
        self.link = link
        self.shards = link.shards
        self.recovery_timeout_s = recovery_timeout_s
        #: Why the shards cannot serve right now (a restart being recovered), or None.
        self.unavailable: str | None = None
        self.allocator = allocator
        self.limits = limits
        self.tokenizer = tokenizer
        self.metrics = metrics or RouterMetrics()
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # in the shard batch, in admission order
        self.batch_id = 1
        self._shard_members: list[int] = []
        self._decodes_since_admission = 0
        self._wake = asyncio.Event()
        #: Send step N+1 before step N's answer is in where possible (PIPELINE_STEPS; ``_can_follow``).
        self.pipeline = pipeline
        self._in_flight: _Flight | None = None
        self._last_landed = 0.0
        #: Recent time of a decode step without prompt chunks (shard forward + sampling), seconds.
        self._decode_s: float | None = None
        # Step numbers for the shards' ordering of pipelined calls: unique across router
        # restarts facing the same shard process, hence a random start.
        self._step_ids = itertools.count(random.getrandbits(48) + 1)
        #: The kind of shard call in progress ("prefill" or "decode"), for the failure counter.
        self._step_method = "decode"
        #: Set by a ReplicaSet: takes the requests of this replica while it recovers (True if it did).
        self.hand_off: Callable[[list[Request]], bool] | None = None
        self._update_gauges()  # the KV gauges are right before the first request

    # --- called by the API ------------------------------------------------------

    def submit(self, request: Request) -> None:
        attributes = {"switchyard.replica": request.replica} if request.replica else None
        request.queue_span = self.tracer.start_span("queue", context=request.trace_context, attributes=attributes)
        self.metrics.request_arrived(len(request.prompt_ids), request.max_new_tokens)
        self.waiting.append(request)
        self._wake.set()

    def resume(self, request: Request) -> None:
        """A request moved here from a replica that failed: first in line, its tokens recomputed."""
        self.waiting.appendleft(request)
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.active)

    @property
    def load(self) -> float:
        """KV tokens held plus the tokens queued requests still have to compute, against the KV
        capacity (placement's measure of load; shared cached prefixes count once)."""
        held = self.allocator.used_blocks * self.allocator.block_size
        queued = sum(r.length if r.uncached_at_placement is None else r.uncached_at_placement for r in self.waiting)
        return (held + queued) / (self.allocator.num_blocks * self.allocator.block_size)

    def cancel(self, request: Request) -> None:
        """The caller went away: forget a queued request now, a running one at the next step."""
        request.cancelled = True
        if request.phase is Phase.WAITING and request in self.waiting:
            self.waiting.remove(request)
            self._finish(request, "cancelled")
        self._wake.set()

    # --- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                if self._in_flight is None and not self.waiting and not self.active:
                    await self._idle()
                    continue
                try:
                    await self._advance()
                except Exception as exc:
                    await self._abandon_flight()
                    self.metrics.step_finished(self._step_method, ok=False)
                    why = await self.link.problem()
                    if why is None:  # the shard is fine: a fault of this step, fail its requests
                        await self._fail_active(exc)
                    else:
                        log.warning("shard step failed (%s): %s", why, _one_line(exc))
                        await self._recover(why)
        finally:
            if self._in_flight is not None:
                self._in_flight.answer.cancel()

    async def _advance(self) -> None:
        """Sends a step or takes in an answer; where it can, the next step goes out first.

        While step N computes, step N+1 (a pure decode of the same requests) is
        already queued at the shards, so they go from one forward to the next
        without waiting for the answer to travel here and the next call back.
        """
        flight = self._in_flight
        if flight is None:
            if await self._launch():
                return
            # Nothing to compute: the plan may have just dropped the last (cancelled) request,
            # so the shard's batch and the gauges are brought up to date below.
            await asyncio.sleep(0)  # let the callers run
        else:
            if self.pipeline and self._can_follow(flight) and await self._still_computing(flight):
                await self._launch(after=flight)
            await self._land(flight)
            # The answer of the step now in flight may already be here, and awaiting it would
            # not let the streams run: yield, so each stream takes this step's token on its own
            # rather than merged with the next one (merging is for consumers that fall behind).
            await asyncio.sleep(0)
        if not self.active and self._in_flight is None:
            await self._sync_batch()  # idle: the shard holds nothing
        self._update_gauges()

    async def _idle(self) -> None:
        """Sleeps until work arrives, checking meanwhile that the shards were not restarted."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), IDLE_CHECK_INTERVAL_S)
        except TimeoutError:
            why = await self.link.problem()
            if why is not None:
                await self._recover(why)

    async def check_shards(self) -> None:
        """For Health: raises ShardsUnavailable while the shards cannot serve (and starts recovering them)."""
        if self.unavailable is None:
            why = await self.link.problem()
            if why is None:
                return
            self.unavailable = why  # the loop notices it at its next idle check or failed step
        raise ShardsUnavailable(self.unavailable)

    async def step(self) -> None:
        """One shard call and one forward (prompt chunks and decode tokens together), its
        answer taken in before this returns."""
        if self._in_flight is not None:
            await self._land(self._in_flight)
        if await self._launch():
            assert self._in_flight is not None
            await self._land(self._in_flight)
        if not self.active:
            await self._sync_batch()  # idle: the shard holds nothing (else the next step's call says so)
        self._update_gauges()

    # --- sending steps and taking in their answers -------------------------------

    async def _launch(self, after: _Flight | None = None) -> bool:
        """Plans the next step and sends it; False when there is nothing to compute.

        With ``after`` (a decode whose answer is not in yet, see ``_can_follow``) the
        plan is the state that step leaves: every decoding request one token longer,
        and the ones it ends for sure (length limits) dropped; arrivals are admitted
        as usual.
        """
        self._drop_cancelled()
        items = self._plan_prefill()
        chunked = {i.request.id for i in items}
        decoding = [r for r in self.active if r.phase is Phase.DECODING and r.id not in chunked]
        if after is not None:
            decoding = [r for r in decoding if not self._ends_in_flight(r)]
        extensions = self._grow_blocks(decoding, ahead=0 if after is None else 1)
        # Growing blocks may have preempted requests, just-admitted ones included.
        items = [i for i in items if i.request.phase is Phase.PREFILLING]
        decoding = [r for r in decoding if r.phase is Phase.DECODING]
        step_id = next(self._step_ids)
        if decoding:
            stay = {r.id for r in decoding} | {i.request.id for i in items}
            drop = [rid for rid in self._shard_members if rid not in stay]
            order = DecodeOrder(items, drop, step_id, after.step_id if after is not None else 0)
            self._decodes_since_admission += 1
            self._send("decode", items, decoding, drop, step_id, self.shards.decode([self.batch_id], extensions, order))
        elif items and after is None:
            await self._sync_batch()
            self._send("prefill", items, [], [], step_id, self.shards.prefill(self.batch_id, items))
        else:
            # Nothing to compute; or, ahead of ``after``, nobody left decoding (preempted): a
            # Prefill may not overtake ``after``, so the chunks planned wait for its answer
            # (they are planned again then: their blocks stay allocated).
            return False
        return True

    def _send(
        self,
        method: str,
        items: list[PrefillItem],
        decoding: list[Request],
        drop: list[int],
        step_id: int,
        call: Coroutine[Any, Any, StepAnswer],
    ) -> None:
        """Starts the shard call of a step; ``_land`` takes in its answer."""
        self._step_method = method
        span = self._step_span(method, decoding + [i.request for i in items])
        dropped = set(drop)
        members = [rid for rid in self._shard_members if rid not in dropped]
        known = set(members)
        self._shard_members = members + [i.request.id for i in items if i.request.id not in known]
        # The span is current while the call's task starts, so the shards' spans join its trace.
        with trace.use_span(span, end_on_exit=False):
            answer = asyncio.ensure_future(call)
        self._in_flight = _Flight(method, answer, items, span, time.perf_counter(), step_id)

    async def _land(self, flight: _Flight) -> None:
        """Takes in a step's answer: token events, finished requests, computed chunks."""
        try:
            answer = await flight.answer
        finally:
            flight.span.end()
            if self._in_flight is flight:
                self._in_flight = None
        # A pipelined step was sent while its predecessor ran: its time starts when that one landed.
        self._observe_step(flight.method, max(flight.started, self._last_landed), answer)
        self._last_landed = time.perf_counter()
        if flight.method == "decode" and not flight.items:
            took = (answer.forward_ns + answer.decode_ns) / 1e9
            self._decode_s = took if self._decode_s is None else self._decode_s + 0.25 * (took - self._decode_s)
        if self._in_flight is None:  # else the step in flight already changed the batch
            self._shard_members = answer.request_ids
        self._chunks_computed(flight.items)
        self._postprocess(answer.generations, flight.method)

    async def _abandon_flight(self) -> None:
        """After a failed step: waits out the call still in flight (its answer is void)."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return
        flight.span.end()
        with contextlib.suppress(Exception):  # the failure being handled is the one that counts
            await flight.answer

    def _can_follow(self, flight: _Flight) -> bool:
        """Whether the next step can go out before ``flight``'s answer is in.

        After a step without prompt chunks, every planning input is known without
        its answer: each decoding request is one token further, and arrivals and
        next chunks are planned as usual (they were not in ``flight``). A request
        ending on a stop token or EOS is found out one step late; its extra token is
        dropped, as TGI's and vLLM's overlap do. The shards run the steps in the
        order sent, so blocks freed (or preempted) now are written by ``flight``
        before the next step reuses them. After a step with prompt chunks the next
        waits for the answer: which prompts it completed decides who decodes.
        """
        if flight.method != "decode" or flight.items:
            return False
        continuing = [r for r in self.active if r.phase is Phase.DECODING and not self._ends_in_flight(r)]
        needed = sum(max(0, self.allocator.blocks_for(r.computed + 2) - len(r.blocks)) for r in continuing)
        return bool(continuing) and needed <= self.allocator.free_blocks

    async def _still_computing(self, flight: _Flight) -> bool:
        """Waits until shortly before ``flight`` is expected to end; False if its answer came first.

        The step sent ahead is planned as late as still keeps the shards busy, so
        that requests arriving meanwhile join it rather than the step after it (a
        step sent at once would make every arrival wait one step longer). The
        expected end: the predecessor's landing (``flight`` started about then) plus
        the recent decode step time; the lead (SEND_AHEAD_S and SEND_AHEAD_SHARE of the
        step) covers sending.
        """
        if self._decode_s is None or self._decode_s < LATE_SEND_MIN_STEP_S:
            return True
        lead_s = SEND_AHEAD_S + SEND_AHEAD_SHARE * self._decode_s
        wait_s = self._last_landed + self._decode_s - lead_s - time.perf_counter()
        if wait_s > 0:
            await asyncio.wait([flight.answer], timeout=wait_s)
        return not flight.answer.done() and self._can_follow(flight)

    def _ends_in_flight(self, r: Request) -> bool:
        """Whether the token r gets from the step in flight is its last for sure (a length limit)."""
        return len(r.generated) + 1 >= r.max_new_tokens or r.length + 1 >= self.limits.max_total_tokens

    def _chunks_computed(self, items: list[PrefillItem]) -> None:
        for item in items:
            r = item.request
            r.computed += item.chunk_len
            self.metrics.prefill_tokens.inc(item.chunk_len)
            if r.use_prefix_cache:
                r.chain = self.allocator.register(r.blocks, r.token_ids, r.computed, r.chain)

    # --- prefill planning -------------------------------------------------------

    def _plan_prefill(self) -> list[PrefillItem]:
        budget = self.limits.max_batch_prefill_tokens
        items: list[PrefillItem] = []
        # Prompts part-way through chunked prefill go first: they are older.
        for r in self.active:
            if r.phase is Phase.PREFILLING and budget > 0:
                item = self._next_chunk(r, budget)
                if item is None:
                    return items
                items.append(item)
                budget -= item.chunk_len
        if not self._admission_due():
            return items
        self._decodes_since_admission = 0
        admitted = False
        while self.waiting and budget > 0 and len(self.active) < self.limits.max_batch_size:
            item = self._admit(self.waiting[0], budget)
            if item is None:
                break  # first come, first served: nobody overtakes the head of the queue
            r = self.waiting.popleft()
            r.phase = Phase.PREFILLING
            self.active.append(r)
            self._admitted(r)
            admitted = True
            if r.queue_span is not None:
                r.queue_span.end()
            items.append(item)
            budget -= item.chunk_len
        if admitted:
            self.metrics.batch_next_size.observe(len(self.active))
        return items

    def _admitted(self, r: Request) -> None:
        now = time.monotonic()
        if r.admitted_at is None:  # the first admission (not a preempted request coming back)
            r.admitted_at = now
            self.metrics.queue_duration.observe(now - r.arrived_at)
            self.metrics.vllm_queue_time.observe(now - r.arrived_at)

    def _step_span(self, name: str, requests: list[Request]) -> Span:
        """A span for one batch step, in the trace of its oldest request and linked to every other one.

        ``_send`` makes it current while the shard call starts, so the shards' spans join that trace.
        """
        contexts = [r.trace_context for r in requests if r.trace_context is not None]
        links = [trace.Link(trace.get_current_span(c).get_span_context()) for c in contexts[1:]]
        return self.tracer.start_span(
            name, context=contexts[0] if contexts else None, links=links, attributes={"switchyard.batch": len(requests)}
        )

    def _admission_due(self) -> bool:
        """TGI's policy for interrupting decode with a prefill of new arrivals.

        With nothing decoding, admit at once. Otherwise wait until enough
        requests queue up (``waiting_served_ratio`` times the running batch) or
        enough decode steps ran without them (``max_waiting_tokens``), so that
        a trickle of arrivals does not slow every running stream at each step.
        """
        if not self.waiting:
            return False
        decoding = sum(1 for r in self.active if r.phase is Phase.DECODING)
        if decoding == 0 or self._decodes_since_admission >= self.limits.max_waiting_tokens:
            return True
        return len(self.waiting) >= int(decoding * self.limits.waiting_served_ratio)

    def _admit(self, r: Request, budget: int) -> PrefillItem | None:
        """The first chunk of a queued request, after taking what the prefix cache holds."""
        if r.use_prefix_cache:
            r.blocks, r.chain = self.allocator.match_prefix(r.token_ids)
            r.computed = len(r.blocks) * self.allocator.block_size
        item = self._next_chunk(r, budget)
        if item is None:  # all or nothing: give the cache hits back
            self.allocator.release(r.blocks)
            r.blocks, r.chain, r.computed = [], NEW_CHAIN, 0
            return None
        self.metrics.prefix_hit_tokens.inc(r.computed)
        if not r.generated:  # the prompt's first admission (a recomputation's hits are not the client's)
            r.cached_tokens = min(r.computed, len(r.prompt_ids))
            self.metrics.prompt_tokens.inc(len(r.prompt_ids))
            self.metrics.prefix_queries.inc(len(r.prompt_ids))
            self.metrics.prefix_hits.inc(r.cached_tokens)
        return item

    def _next_chunk(self, r: Request, budget: int) -> PrefillItem | None:
        """The next chunk of ``r`` within ``budget``, its blocks allocated; None if blocks are short."""
        chunk = min(r.length - r.computed, budget)
        needed = self.allocator.blocks_for(r.computed + chunk) - len(r.blocks)
        try:
            r.blocks += self.allocator.allocate(max(0, needed))
        except OutOfBlocks:
            return None
        return PrefillItem(r, r.computed, chunk)

    # --- decode -----------------------------------------------------------------

    def _grow_blocks(self, decoding: list[Request], ahead: int = 0) -> dict[int, list[int]]:
        """A block for every decoding request whose next token starts one, preempting the youngest if short.

        ``ahead``: tokens the step in flight adds before this one (``_can_follow`` made sure
        no preemption is needed then)."""
        extensions: dict[int, list[int]] = {}
        for r in decoding:
            if r.phase is not Phase.DECODING:
                continue  # preempted earlier in this loop
            needed = self.allocator.blocks_for(r.computed + 1 + ahead) - len(r.blocks)
            while needed > 0 and r.phase is Phase.DECODING:
                try:
                    new = self.allocator.allocate(self._run_of(r, needed))
                except OutOfBlocks:
                    self._preempt(max(self.active, key=lambda x: x.id))  # ids grow with arrival
                    continue
                r.blocks += new
                extensions[r.id] = new
                needed = 0
        return {rid: blocks for rid, blocks in extensions.items() if rid in {x.id for x in self.active}}

    def _run_of(self, r: Request, needed: int) -> int:
        """``blocks_to_take`` for ``r`` in this scheduler's cache."""
        final = min(len(r.prompt_ids) + r.max_new_tokens, self.limits.max_total_tokens)
        fillable = self.allocator.blocks_for(final - 1) - len(r.blocks)  # the last token gets no KV
        spare = self.allocator.free_blocks - len(self.active) * DECODE_BLOCK_RUN
        return blocks_to_take(needed, fillable, spare)

    def _preempt(self, r: Request) -> None:
        log.info("preempting request %d (%d tokens) for lack of KV blocks", r.id, r.length)
        self.metrics.preemptions.inc()
        self.active.remove(r)
        self.allocator.release(r.blocks)
        r.blocks, r.computed, r.chain, r.phase = [], 0, NEW_CHAIN, Phase.WAITING
        self.waiting.appendleft(r)

    # --- results ----------------------------------------------------------------

    def _postprocess(self, generations: list[ShardGeneration], method: str) -> None:
        started = time.perf_counter()
        self._emit(generations)
        self.metrics.generation_tokens.inc(len(generations))
        self.metrics.filter_duration.labels(method).observe(time.perf_counter() - started)

    def _emit(self, generations: list[ShardGeneration]) -> None:
        """Each generated token to its request's stream; requests that are done finish."""
        by_id = {r.id: r for r in self.active}
        now = time.monotonic()
        for g in generations:
            r = by_id.get(g.request_id)
            if r is None or r.phase is Phase.FINISHED:
                continue
            r.computed = r.length
            r.generated.append(g.token_id)
            r.phase = Phase.DECODING
            self._observe_token(r, now)
            text = r.stream.push(g.token_id)
            token = self._token_info(r, g)
            finish = r.stream.finish
            if finish is None and r.length >= self.limits.max_total_tokens:
                finish = "length"
            if finish:
                r.events.put_nowait(self._final_event(r, text, token, finish))
                self._finish(r, finish)
            else:
                r.events.put_nowait(StreamEvent(text, (token,)))

    def _final_event(self, r: Request, text: str, token: TokenInfo, finish: str) -> StreamEvent:
        counts = (len(r.prompt_ids), len(r.generated))
        made = r.stream.tool_calls()
        if made is not None:
            after, calls = made
            return StreamEvent(
                text + after, (token,), "tool_calls", *counts, tool_calls=tuple(calls), cached_tokens=r.cached_tokens
            )
        text += r.stream.unreleased()  # a call cut short (max_tokens): what there is goes out as text
        return StreamEvent(text, (token,), finish, *counts, cached_tokens=r.cached_tokens)

    def _token_info(self, r: Request, g: ShardGeneration) -> TokenInfo:
        special = self.tokenizer.is_special(g.token_id)
        if not r.want_logprobs:
            return TokenInfo(g.token_id, g.logprob, special)
        text = self.tokenizer.token_text
        top = tuple((t, lp, text(t)) for t, lp in g.top)
        return TokenInfo(g.token_id, g.logprob, special, text(g.token_id), top)

    def _finish(self, r: Request, outcome: str) -> None:
        r.phase = Phase.FINISHED
        if r.queue_span is not None and r.queue_span.is_recording():
            r.queue_span.end()
        if r in self.active:
            self.active.remove(r)
        if r.blocks:
            self.allocator.release(r.blocks)
            r.blocks = []
        now = time.monotonic()
        inference_s = now - r.admitted_at if r.admitted_at is not None else None
        self.metrics.request_finished(outcome, len(r.generated), now - r.arrived_at, inference_s)

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.active if r.cancelled]:
            self._finish(r, "cancelled")

    async def _sync_batch(self) -> None:
        """Drops from the shard batch whoever left ``active`` (finished, cancelled, preempted).

        Requests admitted in this step join the batch through the step's call itself."""
        active = {r.id for r in self.active}
        keep = [rid for rid in self._shard_members if rid in active]
        if keep != self._shard_members:
            if keep:
                await self.shards.filter(self.batch_id, keep)
            else:
                await self.shards.clear(self.batch_id)
        self._shard_members = keep

    # --- shard restarts -----------------------------------------------------------

    async def _recover(self, why: str) -> None:
        """Warms the restarted shards and queues every running request for recomputation.

        The shards' KV is gone, so the allocator starts empty (its prefix cache
        described that KV) and each running request goes back to the head of the
        queue, oldest first, keeping its generated tokens. Requests that wait longer
        than the recovery timeout meanwhile end with an error.
        """
        self.unavailable = why
        self.metrics.shard_recoveries.inc()
        self.metrics.shards_up.set(0)
        started = time.monotonic()
        log.warning("%s: recomputing %d running requests once it is warm", why, len(self.active))
        for r in reversed(self.active):
            r.blocks, r.computed, r.chain, r.phase = [], 0, NEW_CHAIN, Phase.WAITING
            self.waiting.appendleft(r)
        self.active = []
        self._shard_members = []
        self.batch_id += 1
        if self.waiting and self.hand_off is not None and self.hand_off(list(self.waiting)):
            log.warning("%d requests moved to the other replicas", len(self.waiting))
            self.waiting.clear()
        restore = asyncio.create_task(self.link.restore())
        while not restore.done():
            self._expire_waiting(started)
            self._update_gauges()
            await asyncio.wait([restore], timeout=0.5)
        warm = restore.result()
        self.allocator = BlockAllocator(warm.num_blocks, warm.block_size)
        for r in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(r)
            self._finish(r, "cancelled")
        self.unavailable = None
        self.metrics.shards_up.set(1)
        log.info("shards warm again after %.1fs; resuming %d requests", time.monotonic() - started, len(self.waiting))
        self._update_gauges()

    def _expire_waiting(self, recovery_started: float) -> None:
        now = time.monotonic()
        for r in list(self.waiting):
            if now - max(r.arrived_at, recovery_started) > self.recovery_timeout_s:
                error = ShardsUnavailable(f"the model server did not recover within {self.recovery_timeout_s:.0f}s")
                r.events.put_nowait(StreamEvent("", (), error=error))
                self.waiting.remove(r)
                self._finish(r, "error")

    async def _fail_active(self, exc: Exception) -> None:
        fault_id = uuid.uuid4().hex[:12]
        log.error("fault %s: shard step failed, failing %d requests: %s", fault_id, len(self.active), _one_line(exc))
        error = ShardFailure(f"the model failed to compute this request (fault id {fault_id})")
        for r in list(self.active):
            r.events.put_nowait(StreamEvent("", (), error=error))
            self._finish(r, "error")
        self._shard_members = []
        self.batch_id += 1
        try:
            await self.shards.clear()
        except Exception as clear_exc:
            log.error("could not clear the shards after a failure: %s", clear_exc)
        self._update_gauges()

    # --- metrics ----------------------------------------------------------------

    def _observe_step(self, method: str, started: float, answer: StepAnswer) -> None:
        self.metrics.step_duration.labels(method).observe(time.perf_counter() - started)
        self.metrics.forward_duration.labels(method).observe(answer.forward_ns / 1e9)
        self.metrics.decode_duration.labels(method).observe(answer.decode_ns / 1e9)
        self.metrics.step_finished(method, ok=True)

    def _observe_token(self, r: Request, now: float) -> None:
        if r.last_token_at is None:
            self.metrics.ttft.observe(now - r.arrived_at)
        else:
            self.metrics.inter_token.observe(now - r.last_token_at)
        r.last_token_at = now

    def _update_gauges(self) -> None:
        m, a = self.metrics, self.allocator
        m.queue_size.set(len(self.waiting))
        m.batch_size.set(len(self.active))
        m.batch_tokens.set(sum(r.computed for r in self.active))
        m.blocks_used.set(a.used_blocks)
        m.blocks_free.set(a.free_blocks)
        m.blocks_cached.set(a.cached_blocks)
        m.running.set(len(self.active))
        m.waiting.set(len(self.waiting))
        m.kv_usage.set(a.used_blocks / a.num_blocks)


@dataclass
class _Flight:
    """A step call sent to the shards whose answer the router has not taken in yet."""

    method: str
    answer: asyncio.Future[StepAnswer]
    items: list[PrefillItem]
    span: Span
    started: float
    step_id: int


def _one_line(exc: Exception) -> str:
    """A shard call's failure for the log: gRPC's status and details, not its multi-line repr."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
