"""Planning each batch step: admission, prompt chunks, KV block growth, preemption.

Pure bookkeeping over the queue, the running batch and the block allocator: no
asyncio, no gRPC, no metrics, no spans. The scheduler (``router.scheduler``)
sends the ``StepPlan`` that ``plan`` returns, reports what it holds, and tells
the planner what the shards computed (``chunks_computed``, ``token_computed``).

Policy. Requests are served first come, first served: nobody overtakes the head
of the queue. A step takes the next chunks of prompts part-way through chunked
prefill first (they are older), then arrivals in order (TGI's admission policy,
``admission_due``), then preempted requests being recomputed (they wait at the
head of the queue), all within the prompt budget (MAX_BATCH_PREFILL_TOKENS),
which bounds how long a step with a new prompt holds back the running streams;
and one token for every decoding request. When KV blocks run out mid-generation
the youngest running request is preempted: it returns to the head of the queue
keeping its tokens and is recomputed (mostly from the prefix cache) when blocks
free up. After a shard restart every running request is requeued the same way
(``requeue_running``).

Under SCHEDULING_POLICY=priority the queue is kept in (priority, arrival) order
instead (lower priority values first, vLLM's convention; a preempted request
goes back to its own place in that order), the request preempted for blocks is
the lowest-priority, youngest one, and a queued request that cannot be admitted
(blocks short, or the batch full) preempts running requests of a strictly higher
value until it fits. Recomputation is lossless, so preemption changes when a
request's tokens come, never which.

Invariants (checked by tests/router/test_planner.py after every call): a request
is queued, running or finished, never two; queued requests hold no blocks; the
allocator's reference counts are exactly the blocks running requests hold; the
batch never exceeds MAX_BATCH_SIZE, nor a step's prompt chunks the budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from router.blocks import NEW_CHAIN, BlockAllocator
from router.config import Limits
from router.errors import OutOfBlocks
from router.request import Phase, Request
from router.shard_client import PrefillItem
from router.speculation import Guesses, SpeculationPolicy

#: A decoding request that needs a block takes up to this many at once (no more than its length
#: limit can fill, and only while the cache keeps as many for every active request), so that its
#: KV lies in runs of contiguous blocks rather than one block between each of the other streams'
#: (decode attention walks a sequence's blocks in order; the measurements are in
#: docs/performance.md, "KV block runs"). Blocks taken ahead are used or freed with the request.
DECODE_BLOCK_RUN = 4


def _priority_key(r: Request) -> tuple[int, int]:
    """Queue order under the priority policy: priority value, then arrival (ids grow with it)."""
    return r.priority, r.id


def blocks_to_take(needed: int, fillable: int, spare: int) -> int:
    """How many blocks a decoding request takes when it needs ``needed`` more: a run of
    DECODE_BLOCK_RUN where its length limit can fill them (``fillable``: the blocks its last KV
    token needs beyond those it holds) and the cache keeps a run for every active request
    (``spare``: free blocks beyond those runs), else only ``needed``."""
    run = min(DECODE_BLOCK_RUN, fillable)
    return run if needed < run <= spare else needed


@dataclass
class Admission:
    """A queued request that joined the batch in this step."""

    request: Request
    #: Tokens the prefix cache served it.
    cached: int
    #: Its prompt's first admission (not a preempted or requeued request coming back).
    first: bool


@dataclass
class StepPlan:
    """What one step computes: prompt chunks and one token for each decoding request.

    ``method`` is the shard call that carries it: "decode" when anything decodes
    (prompt chunks ride along), "prefill" for prompt chunks alone, None when
    there is nothing to send.
    """

    method: str | None
    chunks: list[PrefillItem]
    decoding: list[Request]
    #: Blocks each decoding request took for this step, by request id.
    extensions: dict[int, list[int]]
    admitted: list[Admission] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    #: Running requests whose caller went away, retired by this plan.
    cancelled: list[Request] = field(default_factory=list)
    #: Speculative guesses per decoding request id (router.speculation); their KV slots are allocated.
    guesses: dict[int, Guesses] = field(default_factory=dict)

    @property
    def requests(self) -> list[Request]:
        return self.decoding + [item.request for item in self.chunks]


class Planner:
    def __init__(self, allocator: BlockAllocator, limits: Limits, speculation: SpeculationPolicy | None = None):
        self.allocator = allocator
        self.limits = limits
        #: Guesses for decoding requests (SPECULATE); None: no speculation.
        self.speculation = speculation
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # in the shard batch, in admission order
        #: Decode steps since arrivals were last admitted (TGI's ``max_waiting_tokens``).
        self.decodes_since_admission = 0

    # --- the queue --------------------------------------------------------------

    def enqueue(self, request: Request) -> None:
        self._queue(request, first=False)

    def enqueue_first(self, request: Request) -> None:
        """A request whose tokens are recomputed (moved from a failed replica): first in line."""
        self._queue(request, first=True)

    def _queue(self, request: Request, first: bool) -> None:
        """Into the queue: at its head or tail (fcfs), or at its place in (priority, arrival) order."""
        if not self.limits.by_priority:
            self.waiting.appendleft(request) if first else self.waiting.append(request)
            return
        key = _priority_key(request)
        at = next((i for i, r in enumerate(self.waiting) if _priority_key(r) > key), len(self.waiting))
        self.waiting.insert(at, request)

    def retire(self, request: Request) -> None:
        """The request is done (finished, cancelled or failed): it leaves the queue or the batch
        and gives its blocks back."""
        request.phase = Phase.FINISHED
        if request in self.active:
            self.active.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.blocks:
            self.allocator.release(request.blocks)
            request.blocks = []

    @property
    def load(self) -> float:
        """KV tokens held plus the tokens queued requests still have to compute, against the KV
        capacity (placement's measure of load; shared cached prefixes count once)."""
        held = self.allocator.used_blocks * self.allocator.block_size
        queued = sum(r.length if r.uncached_at_placement is None else r.uncached_at_placement for r in self.waiting)
        return (held + queued) / (self.allocator.num_blocks * self.allocator.block_size)

    # --- planning a step ----------------------------------------------------------

    def plan(self, ahead: bool = False) -> StepPlan:
        """The next step.

        ``ahead``: it is sent before the answer of a decode step in flight
        (``can_plan_ahead`` said so), so it plans the state that step leaves:
        every decoding request one token longer, and the ones it ends for sure
        (length limits) left out. A prefill-only step cannot go ahead (it would
        overtake the step in flight): its chunks keep their blocks and are planned
        again at the next step.
        """
        cancelled = [r for r in self.active if r.cancelled]
        for r in cancelled:
            self.retire(r)
        admitted: list[Admission] = []
        preempted: list[Request] = []
        chunks = self._plan_chunks(admitted, preempted if not ahead else None)
        chunked = {item.request.id for item in chunks}
        decoding = [r for r in self.active if r.phase is Phase.DECODING and r.id not in chunked]
        if ahead:
            decoding = [r for r in decoding if not self.ends_with_step_in_flight(r)]
        extensions = self._grow_blocks(decoding, 1 if ahead else 0, preempted)
        # Admitting or growing blocks may have preempted requests, just-admitted ones included.
        chunks = [item for item in chunks if item.request.phase is Phase.PREFILLING]
        decoding = [r for r in decoding if r.phase is Phase.DECODING]
        # A step planned ahead cannot guess: its requests' next token is still being computed.
        guesses = self._guesses(decoding, extensions) if not ahead else {}
        if self.speculation is not None:
            self.speculation.planned(ahead)
        method = "decode" if decoding else "prefill" if chunks and not ahead else None
        if method == "decode":
            self.decodes_since_admission += 1
        return StepPlan(method, chunks, decoding, extensions, admitted, preempted, cancelled, guesses)

    def _guesses(self, decoding: list[Request], extensions: dict[int, list[int]]) -> dict[int, Guesses]:
        """Each decoding request's guesses, with blocks for their KV slots where the cache has them
        free (never by preempting: a guess is not worth a recomputation)."""
        if self.speculation is None:
            return {}
        found = {}
        for r in decoding:
            guesses = self.speculation.guesses(r, len(decoding), self.limits.max_total_tokens)
            if not guesses:
                continue
            needed = self.allocator.blocks_for(r.computed + 1 + len(guesses)) - len(r.blocks)
            if needed > 0:
                needed = min(needed, self.allocator.free_blocks)
                new = self.allocator.allocate(needed)
                r.blocks += new
                extensions[r.id] = extensions.get(r.id, []) + new
            room = len(r.blocks) * self.allocator.block_size - (r.computed + 1)
            if guesses := guesses.cut(room):
                found[r.id] = guesses
        return found

    def can_plan_ahead(self, last_method: str, last_had_chunks: bool, last_had_guesses: bool = False) -> bool:
        """Whether the next step can be planned before the answer of the step in flight is in.

        After a step without prompt chunks, every planning input is known without
        its answer: each decoding request is one token further, and arrivals and
        next chunks are planned as usual (they were not in that step). A request
        ending on a stop token or EOS is found out one step late; its extra token is
        dropped, as TGI's and vLLM's overlap do. The shards run the steps in the
        order sent, so blocks freed (or preempted) now are written by the step in
        flight before the next step reuses them. After a step with prompt chunks the
        next waits for the answer: which prompts it completed decides who decodes.
        No preemption may be needed ahead. After a step with guesses the next waits too: how
        many tokens it adds is known only from its answer.
        """
        if last_method != "decode" or last_had_chunks or last_had_guesses:
            return False
        continuing = [r for r in self.active if r.phase is Phase.DECODING and not self.ends_with_step_in_flight(r)]
        if self.speculation is not None and self.speculation.wait_for_answer(continuing):
            return False
        needed = sum(max(0, self.allocator.blocks_for(r.computed + 2) - len(r.blocks)) for r in continuing)
        return bool(continuing) and needed <= self.allocator.free_blocks

    def ends_with_step_in_flight(self, r: Request) -> bool:
        """Whether the token r gets from the step in flight is its last for sure (a length limit)."""
        return len(r.generated) + 1 >= r.max_new_tokens or r.length + 1 >= self.limits.max_total_tokens

    def _plan_chunks(self, admitted: list[Admission], preempted: list[Request] | None) -> list[PrefillItem]:
        """Prompt chunks within the budget; ``preempted``: where requests preempted for a
        higher-priority arrival go (None: none may be, as in a step planned ahead)."""
        budget = self.limits.max_batch_prefill_tokens
        items: list[PrefillItem] = []
        for r in self.active:  # prompts part-way through chunked prefill go first: they are older
            # (An embedding request whose input is all computed waits only for its vector.)
            if r.phase is Phase.PREFILLING and budget > 0 and r.computed < r.length:
                item = self._next_chunk(r, budget)
                if item is None:
                    return items
                items.append(item)
                budget -= item.chunk_len
        if not self.admission_due():
            return items
        self.decodes_since_admission = 0
        while self.waiting and budget > 0:
            head = self.waiting[0]
            full = len(self.active) >= self.limits.max_batch_size
            admission = None if full else self._admit(head, budget)
            if admission is None:
                if preempted is not None and self._preempt_for(head, preempted):
                    continue
                break  # nobody overtakes the head of the queue
            item, r = admission, self.waiting.popleft()
            r.phase = Phase.PREFILLING
            self.active.append(r)
            admitted.append(Admission(r, r.computed, not r.generated))
            items.append(item)
            budget -= item.chunk_len
        return items

    def admission_due(self) -> bool:
        """TGI's policy for interrupting decode with a prefill of new arrivals.

        With nothing decoding, admit at once. Otherwise wait until enough
        requests queue up (``waiting_served_ratio`` times the running batch) or
        enough decode steps ran without them (``max_waiting_tokens``), so that
        a trickle of arrivals does not slow every running stream at each step.
        """
        if not self.waiting:
            return False
        decoding = sum(1 for r in self.active if r.phase is Phase.DECODING)
        if decoding == 0 or self.decodes_since_admission >= self.limits.max_waiting_tokens:
            return True
        return len(self.waiting) >= int(decoding * self.limits.waiting_served_ratio)

    def _admit(self, r: Request, budget: int) -> PrefillItem | None:
        """The first chunk of a queued request, after taking what the prefix cache holds."""
        if r.use_prefix_cache:
            r.blocks, r.chain = self.allocator.match_prefix(r.token_ids, r.adapter)
            r.computed = len(r.blocks) * self.allocator.block_size
        item = self._next_chunk(r, budget)
        if item is None:  # all or nothing: give the cache hits back
            self.allocator.release(r.blocks)
            r.blocks, r.chain, r.computed = [], NEW_CHAIN, 0
            return None
        if not r.generated:  # the prompt's first admission (a recomputation's hits are not the client's)
            r.cached_tokens = min(r.computed, len(r.prompt_ids))
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

    def _grow_blocks(self, decoding: list[Request], ahead: int, preempted: list[Request]) -> dict[int, list[int]]:
        """A block for every decoding request whose next token starts one, preempting the youngest if short.

        ``ahead``: tokens the step in flight adds before this one (``can_plan_ahead``
        made sure no preemption is needed then)."""
        extensions: dict[int, list[int]] = {}
        for r in decoding:
            if r.phase is not Phase.DECODING:
                continue  # preempted earlier in this loop
            needed = self.allocator.blocks_for(r.computed + 1 + ahead) - len(r.blocks)
            while needed > 0 and r.phase is Phase.DECODING:
                try:
                    new = self.allocator.allocate(self._run_of(r, needed))
                except OutOfBlocks:
                    victim = self._victim()
                    self._preempt(victim)
                    preempted.append(victim)
                    continue
                r.blocks += new
                extensions[r.id] = new
                needed = 0
        running = {x.id for x in self.active}
        return {rid: blocks for rid, blocks in extensions.items() if rid in running}

    def _run_of(self, r: Request, needed: int) -> int:
        """``blocks_to_take`` for ``r`` in this planner's cache."""
        final = min(len(r.prompt_ids) + r.max_new_tokens, self.limits.max_total_tokens)
        fillable = self.allocator.blocks_for(final - 1) - len(r.blocks)  # the last token gets no KV
        spare = self.allocator.free_blocks - len(self.active) * DECODE_BLOCK_RUN
        return blocks_to_take(needed, fillable, spare)

    def _victim(self) -> Request:
        """The running request preempted when blocks run out: the youngest (ids grow with
        arrival), of the lowest priority under the priority policy."""
        if self.limits.by_priority:
            return max(self.active, key=_priority_key)
        return max(self.active, key=lambda x: x.id)

    def _preempt_for(self, head: Request, preempted: list[Request]) -> bool:
        """Priority policy: preempts the lowest-priority running request if its priority value is
        above ``head``'s, so that ``head`` may be admitted; False when none is."""
        if not self.limits.by_priority or not self.active:
            return False
        victim = self._victim()
        if victim.priority <= head.priority:
            return False
        self._preempt(victim)
        preempted.append(victim)
        return True

    def _preempt(self, r: Request) -> None:
        """Back to the queue (its head, or its place by priority) keeping its tokens; its KV is
        to be recomputed."""
        self.active.remove(r)
        self.allocator.release(r.blocks)
        r.blocks, r.computed, r.chain, r.phase = [], 0, NEW_CHAIN, Phase.WAITING
        self._queue(r, first=True)

    # --- what the shards computed ------------------------------------------------------

    def chunks_computed(self, chunks: list[PrefillItem]) -> None:
        """A step's prompt chunks are in the KV cache: their full blocks join the prefix cache."""
        for item in chunks:
            r = item.request
            r.computed += item.chunk_len
            if r.use_prefix_cache:
                r.chain = self.allocator.register(r.blocks, r.token_ids, r.computed, r.chain)

    def token_computed(self, r: Request, token_id: int) -> None:
        """A step sampled ``token_id`` for ``r``: its sequence so far is computed, the new token decodes next."""
        r.computed = r.length
        r.generated.append(token_id)
        r.phase = Phase.DECODING

    # --- shard restarts -----------------------------------------------------------------

    def requeue_running(self) -> int:
        """The shards lost their KV: every running request goes back to the head of the queue,
        oldest first, keeping its generated tokens; the allocator still describes the lost KV
        and is replaced by ``reset``. Returns how many were requeued."""
        running, self.active = self.active, []
        for r in reversed(running):
            r.blocks, r.computed, r.chain, r.phase = [], 0, NEW_CHAIN, Phase.WAITING
            self._queue(r, first=True)
        return len(running)

    def reset(self, num_blocks: int, block_size: int) -> None:
        """A fresh, empty cache (after a shard restart); nothing may hold blocks."""
        assert not self.active and all(not r.blocks for r in self.waiting)
        self.allocator = BlockAllocator(num_blocks, block_size)
