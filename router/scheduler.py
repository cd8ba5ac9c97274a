"""The continuous-batching loop.

One shard batch (``batch_id``) holds every admitted request. Each iteration:
drop cancelled requests, prefill what the budgets admit (new arrivals, next
chunks of long prompts, preempted requests being recomputed), then advance
every decoding request by one token. Requests are served first come, first
served; when KV blocks run out mid-generation the youngest request is
preempted: it returns to the head of the queue keeping its tokens, and is
recomputed when blocks free up.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

from common.grpc_errors import ServiceError
from router.blocks import BlockAllocator, OutOfBlocks
from router.config import Limits
from router.request import Phase, Request, StreamEvent, TokenInfo
from router.shard_client import PrefillItem, ShardClient, ShardGeneration, StepAnswer
from router.tokenization import Tokenizer

log = logging.getLogger(__name__)


class ShardFailure(ServiceError):
    """A shard call failed; the requests it carried end with this error."""


@dataclass
class SchedulerStats:
    prefill_steps: int = 0
    decode_steps: int = 0
    preemptions: int = 0
    max_batch_size_seen: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class Scheduler:
    def __init__(self, shards: ShardClient, allocator: BlockAllocator, limits: Limits, tokenizer: Tokenizer):
        self.shards = shards
        self.allocator = allocator
        self.limits = limits
        self.tokenizer = tokenizer
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # in the shard batch, oldest first
        self.batch_id = 1
        self.stats = SchedulerStats()
        self._wake = asyncio.Event()

    # --- called by the API ------------------------------------------------------

    def submit(self, request: Request) -> None:
        self.waiting.append(request)
        self._wake.set()

    def cancel(self, request: Request) -> None:
        """The caller went away: forget a queued request now, a running one at the next step."""
        request.cancelled = True
        if request.phase is Phase.WAITING and request in self.waiting:
            self.waiting.remove(request)
            self._finish(request, "cancelled")
        self._wake.set()

    # --- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        while True:
            if not self.waiting and not self.active:
                self._wake.clear()
                await self._wake.wait()
            try:
                await self.step()
            except Exception as exc:  # a shard fault: fail the batch, keep serving
                await self._fail_active(exc)

    async def step(self) -> None:
        await self._drop_cancelled()
        items = self._plan_prefill()
        if items:
            answer = await self.shards.prefill(self.batch_id, items)
            self._shard_members = answer.request_ids
            self.stats.prefill_steps += 1
            self._account(items, answer)
        decoding = [r for r in self.active if r.phase is Phase.DECODING]
        if decoding:
            extensions = self._grow_blocks(decoding)
            if self._preempted:
                await self._sync_batch()
            if any(r.phase is Phase.DECODING for r in self.active):
                answer = await self.shards.decode([self.batch_id], extensions)
                self._shard_members = answer.request_ids
                self.stats.decode_steps += 1
                self._postprocess(answer.generations)
        self.stats.max_batch_size_seen = max(self.stats.max_batch_size_seen, len(self.active))
        await self._sync_batch()

    # --- prefill planning -------------------------------------------------------

    def _plan_prefill(self) -> list[PrefillItem]:
        budget = self.limits.max_batch_prefill_tokens
        items: list[PrefillItem] = []
        # Prompts already part-way through chunked prefill go first: they are older.
        for r in self.active:
            if r.phase is Phase.PREFILLING and budget > 0:
                item = self._chunk(r, budget)
                if item is None:
                    return items
                items.append(item)
                budget -= item.chunk_len
        while self.waiting and budget > 0 and len(self.active) < self.limits.max_batch_size:
            item = self._chunk(self.waiting[0], budget)
            if item is None:
                break  # first come, first served: nobody overtakes the head of the queue
            r = self.waiting.popleft()
            r.phase = Phase.PREFILLING
            self.active.append(r)
            items.append(item)
            budget -= item.chunk_len
        return items

    def _chunk(self, r: Request, budget: int) -> PrefillItem | None:
        """The next chunk of ``r`` within ``budget``, with its blocks allocated; None if blocks are short."""
        remaining = len(r.token_ids) - r.computed
        chunk = min(remaining, budget)
        needed = self.allocator.blocks_for(r.computed + chunk) - len(r.blocks)
        try:
            r.blocks += self.allocator.allocate(r.id, max(0, needed))
        except OutOfBlocks:
            return None
        return PrefillItem(r, r.computed, chunk)

    def _account(self, items: list[PrefillItem], answer: StepAnswer) -> None:
        for item in items:
            item.request.computed += item.chunk_len
        self._postprocess(answer.generations)

    # --- decode -----------------------------------------------------------------

    def _grow_blocks(self, decoding: list[Request]) -> dict[int, list[int]]:
        """Blocks so every decoding request can hold one more token, preempting the youngest if short."""
        self._preempted = False
        extensions: dict[int, list[int]] = {}
        for r in decoding:
            if r.phase is not Phase.DECODING:
                continue  # preempted earlier in this loop
            needed = self.allocator.blocks_for(r.computed + 1) - len(r.blocks)
            while needed > 0:
                try:
                    new = self.allocator.allocate(r.id, needed)
                except OutOfBlocks:
                    victim = max(self.active, key=lambda x: x.id)  # ids grow with arrival
                    self._preempt(victim)
                    if victim is r:
                        break
                    continue
                r.blocks += new
                extensions[r.id] = new
                needed = 0
        return {rid: b for rid, b in extensions.items() if any(x.id == rid for x in self.active)}

    def _preempt(self, r: Request) -> None:
        log.info("preempting request %d (%d tokens) for lack of KV blocks", r.id, len(r.token_ids))
        self.stats.preemptions += 1
        self._preempted = True
        self.active.remove(r)
        self.allocator.free(r.id, r.blocks)
        r.blocks, r.computed, r.phase = [], 0, Phase.WAITING
        self.waiting.appendleft(r)

    # --- results ----------------------------------------------------------------

    def _postprocess(self, generations: list[ShardGeneration]) -> None:
        by_id = {r.id: r for r in self.active}
        for g in generations:
            r = by_id.get(g.request_id)
            if r is None or r.phase is Phase.FINISHED:
                continue
            r.computed = len(r.token_ids)
            r.generated.append(g.token_id)
            r.phase = Phase.DECODING
            text = r.stream.push(g.token_id)
            token = TokenInfo(g.token_id, g.logprob, self.tokenizer.is_special(g.token_id))
            finish = r.stream.finish
            if finish is None and len(r.token_ids) >= self.limits.max_total_tokens:
                finish = "length"
            if finish:
                r.events.put_nowait(StreamEvent(text, (token,), finish, len(r.prompt_ids), len(r.generated)))
                self._finish(r, finish)
            else:
                r.events.put_nowait(StreamEvent(text, (token,)))

    def _finish(self, r: Request, outcome: str) -> None:
        r.phase = Phase.FINISHED
        if r in self.active:
            self.active.remove(r)
        if r.blocks:
            self.allocator.free(r.id, r.blocks)
            r.blocks = []
        self.stats.outcomes[outcome] = self.stats.outcomes.get(outcome, 0) + 1

    async def _drop_cancelled(self) -> None:
        for r in [r for r in self.active if r.cancelled]:
            self._finish(r, "cancelled")

    async def _sync_batch(self) -> None:
        """Makes the shard batch hold exactly the active requests."""
        keep = [r.id for r in self.active]
        if keep != self._shard_members:
            if keep:
                await self.shards.filter(self.batch_id, keep)
            else:
                await self.shards.clear(self.batch_id)
        self._shard_members = keep

    async def _fail_active(self, exc: Exception) -> None:
        log.error("shard step failed, failing %d requests: %s", len(self.active), exc)
        error = ShardFailure(f"the model shard failed: {exc}")
        for r in list(self.active):
            r.events.put_nowait(StreamEvent("", (), error=error))
            self._finish(r, "error")
        self._shard_members = []
        self.batch_id += 1
        try:
            await self.shards.clear()
        except Exception as clear_exc:
            log.error("could not clear the shards after a failure: %s", clear_exc)

    _shard_members: list[int] = []
    _preempted: bool = False
