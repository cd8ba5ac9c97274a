"""The step planner driven directly, without a shard: its invariants after every call, first come
first served, budgets, preemption keeping tokens, planning ahead, and every request finishing."""

from __future__ import annotations

import itertools
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st

from common.sampling_params import SamplingParams
from router.blocks import BlockAllocator
from router.config import Limits
from router.planner import Planner, StepPlan
from router.request import Phase, Request
from router.stopping import StopCondition, TextStream
from router.tokenization import Detokenizer

BLOCK = 4


def make_request(rid: int, prompt_len: int, max_new: int) -> Request:
    condition = StopCondition(frozenset(), max_new, (), ignore_eos=True)
    stream = TextStream(cast(Detokenizer, None), condition)  # the planner never reads text
    prompt = [(rid * 7 + i) % 5 for i in range(prompt_len)]  # repeats, so prefixes are shared
    return Request(rid, prompt, SamplingParams(), stream)


def next_token(r: Request) -> int:
    """A deterministic 'model': a recomputed request gets the same token at the same position."""
    return (sum(r.token_ids) * 31 + r.length) % 5


class Shard:
    """Does what a shard does with a plan, as far as the planner can see: chunks computed, one
    token for each request whose sequence is then complete; the scheduler's retiring of finished ones."""

    def __init__(self, planner: Planner):
        self.planner = planner
        self.finished: list[Request] = []

    def run(self, plan: StepPlan) -> None:
        p = self.planner
        p.chunks_computed(plan.chunks)
        sampled = plan.decoding + [i.request for i in plan.chunks if i.request.computed == i.request.length]
        for r in sampled:
            p.token_computed(r, next_token(r))
            if len(r.generated) >= r.max_new_tokens or r.length >= p.limits.max_total_tokens:
                p.retire(r)
                self.finished.append(r)


def check(planner: Planner, plan: StepPlan | None = None) -> None:
    waiting, active = {r.id for r in planner.waiting}, {r.id for r in planner.active}
    assert not waiting & active, "a request is both queued and running"
    assert all(not r.blocks for r in planner.waiting), "a queued request holds blocks"
    assert all(r.phase is Phase.WAITING for r in planner.waiting)
    assert all(r.phase in (Phase.PREFILLING, Phase.DECODING) for r in planner.active)
    assert len(planner.active) <= planner.limits.max_batch_size
    if planner.limits.by_priority:  # the queue is in (priority, arrival) order
        keys = [(r.priority, r.id) for r in planner.waiting]
        assert keys == sorted(keys)
    else:  # first come, first served: the queue is in arrival order, and everyone running arrived before it
        queue = [r.id for r in planner.waiting]
        assert queue == sorted(queue) and max(active, default=0) < min(queue, default=1 << 62)
    planner.allocator.check({r.id: r.blocks for r in planner.active})
    for r in planner.active:  # every running request holds the blocks its computed tokens need
        assert len(r.blocks) >= planner.allocator.blocks_for(r.computed)
    if plan is not None:
        assert sum(i.chunk_len for i in plan.chunks) <= planner.limits.max_batch_prefill_tokens
        ids = [r.id for r in plan.requests]
        assert len(ids) == len(set(ids)), "a request twice in one step"
        if plan.decoding:
            assert plan.method == "decode"
        else:
            assert plan.method == ("prefill" if plan.chunks else None) or (plan.method is None and plan.chunks)
        for r in plan.decoding:  # its next token's KV slot is allocated
            assert len(r.blocks) >= planner.allocator.blocks_for(r.length)


arrivals = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    arrivals=arrivals,
    num_blocks=st.integers(13, 40),
    budget=st.integers(1, 24),
    batch=st.integers(1, 6),
    waiting_ratio=st.sampled_from([0.0, 1.2]),
    cancel_every=st.integers(0, 7),
)
def test_every_request_finishes_with_its_own_tokens(arrivals, num_blocks, budget, batch, waiting_ratio, cancel_every):
    limits = Limits(47, 48, budget, batch, waiting_ratio, 3)
    planner = Planner(BlockAllocator(num_blocks, BLOCK), limits)
    shard = Shard(planner)
    requests = [make_request(i + 1, p, n) for i, (p, n) in enumerate(arrivals)]
    for r in requests:
        planner.enqueue(r)
    check(planner)
    admitted_order: list[int] = []
    cancelled: set[int] = set()
    for step in itertools.count():
        assert step < 5000, "requests did not finish"
        if not planner.waiting and not planner.active:
            break
        if cancel_every and step % cancel_every == cancel_every - 1 and planner.active:
            victim = planner.active[step % len(planner.active)]
            victim.cancelled = True
            cancelled.add(victim.id)
        plan = planner.plan()
        check(planner, plan)
        assert all(r.cancelled and r.phase is Phase.FINISHED for r in plan.cancelled)
        admitted_order += [a.request.id for a in plan.admitted if a.first]
        shard.run(plan)
        check(planner)
    # A request preempted before its first token comes back as a first admission again: its
    # first time counts.
    admitted_order = list(dict.fromkeys(admitted_order))
    assert admitted_order == sorted(admitted_order), "a request overtook the head of the queue"
    assert planner.allocator.used_blocks == 0
    for r in requests:
        assert r.phase is Phase.FINISHED
        if r.id not in cancelled:
            assert len(r.generated) == min(r.max_new_tokens, limits.max_total_tokens - len(r.prompt_ids))
            assert r.generated == expected(r), "preemption or recomputation changed a token"


def expected(r: Request) -> list[int]:
    """The tokens of ``r`` generated without any interruption."""
    alone = make_request(r.id, len(r.prompt_ids), r.max_new_tokens)
    for _ in range(len(r.generated)):
        alone.generated.append(next_token(alone))
    return alone.generated


@settings(max_examples=40, deadline=None)
@given(arrivals=arrivals, num_blocks=st.integers(13, 40))
def test_a_step_planned_ahead_keeps_the_step_in_flight_and_leaves_out_requests_it_ends(arrivals, num_blocks):
    """Where ``can_plan_ahead`` allows it, the plan made before the step in flight is answered
    matches the state that step leaves: none of that step's requests preempted (only requests
    admitted since, the youngest, can be), none that it ends decoding again."""
    planner = Planner(BlockAllocator(num_blocks, BLOCK), Limits(47, 48, 16, 4, 0.0, 0))
    shard = Shard(planner)
    for i, (p, n) in enumerate(arrivals):
        planner.enqueue(make_request(i + 1, p, n))
    previous = planner.plan()
    for _ in range(3000):
        if previous.method == "decode" and planner.can_plan_ahead(previous.method, bool(previous.chunks)):
            ending = {r.id for r in planner.active if planner.ends_with_step_in_flight(r)}
            ahead = planner.plan(ahead=True)
            check(planner, ahead)
            in_flight = {r.id for r in previous.decoding}
            assert not ({r.id for r in ahead.preempted} & in_flight)
            assert not ({r.id for r in ahead.decoding} & ending)
            assert ahead.method != "prefill"
            shard.run(previous)
            for r in ahead.decoding:  # the step in flight gave them their next token: ahead's KV slot exists
                assert len(r.blocks) >= planner.allocator.blocks_for(r.length)
            previous = ahead
        else:
            shard.run(previous)
            previous = planner.plan()
        check(planner, previous)
        if not planner.waiting and not planner.active and previous.method is None:
            break
    assert planner.allocator.used_blocks == 0


def test_requeue_running_keeps_tokens_and_order():
    planner = Planner(BlockAllocator(32, BLOCK), Limits(47, 48, 64, 8, 0.0, 0))
    shard = Shard(planner)
    first, second, late = make_request(1, 9, 6), make_request(2, 5, 6), make_request(3, 4, 6)
    for r in (first, second):
        planner.enqueue(r)
    for _ in range(3):
        shard.run(planner.plan())
    planner.enqueue(late)
    tokens = {r.id: list(r.generated) for r in (first, second)}
    assert planner.requeue_running() == 2
    planner.reset(32, BLOCK)
    assert [r.id for r in planner.waiting] == [1, 2, 3]  # the running ones first, oldest first
    assert all(r.computed == 0 and not r.blocks and r.generated == tokens[r.id] for r in (first, second))
    check(planner)
    plan = planner.plan()
    assert [i.request.id for i in plan.chunks] == [1, 2, 3]
    assert [i.chunk_len for i in plan.chunks] == [first.length, second.length, late.length]


def drive(planner: Planner, shard: Shard, steps: int = 5000) -> None:
    for _ in range(steps):
        if not planner.waiting and not planner.active:
            return
        plan = planner.plan()
        check(planner, plan)
        shard.run(plan)
        check(planner)
    raise AssertionError("requests did not finish")


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(-2, 2)), min_size=1, max_size=12),
    num_blocks=st.integers(13, 40),
    budget=st.integers(1, 24),
    batch=st.integers(1, 6),
    late=st.integers(0, 6),
)
def test_priority_policy_keeps_every_token_and_serves_the_urgent_first(arrivals, num_blocks, budget, batch, late):
    """SCHEDULING_POLICY=priority: whatever preempts whom, every request ends with the tokens it
    would have had alone; requests arriving while others run are admitted in priority order."""
    limits = Limits(47, 48, budget, batch, 0.0, 0, by_priority=True)
    planner = Planner(BlockAllocator(num_blocks, BLOCK), limits)
    shard = Shard(planner)
    requests = []
    for i, (p, n, priority) in enumerate(arrivals):
        r = make_request(i + 1, p, n)
        r.priority = priority
        requests.append(r)
    for r in requests[: len(requests) // 2]:
        planner.enqueue(r)
    for _ in range(late):  # the rest arrive while the first half runs
        plan = planner.plan()
        check(planner, plan)
        shard.run(plan)
    for r in requests[len(requests) // 2 :]:
        planner.enqueue(r)
    check(planner)
    drive(planner, shard)
    assert planner.allocator.used_blocks == 0
    for r in requests:
        assert r.phase is Phase.FINISHED
        assert r.generated == expected(r), "preemption changed a token"


def test_an_urgent_arrival_preempts_the_least_urgent_running_request():
    """Two low-priority requests hold every block; a priority -1 arrival preempts the least
    urgent (the youngest among equals) and runs at the next step; fcfs would make it wait."""
    for by_priority in (True, False):
        planner = Planner(BlockAllocator(8, BLOCK), Limits(47, 48, 64, 8, 0.0, 0, by_priority=by_priority))
        shard = Shard(planner)
        background = [make_request(1, 14, 12), make_request(2, 14, 12)]
        for r in background:
            r.priority = 5
            planner.enqueue(r)
        shard.run(planner.plan())
        assert planner.allocator.free_blocks == 0
        urgent = make_request(3, 8, 2)
        urgent.priority = -1
        planner.enqueue(urgent)
        plan = planner.plan()
        check(planner, plan)
        if by_priority:
            assert [r.id for r in plan.preempted] == [2] and [a.request.id for a in plan.admitted] == [3]
            assert [r.id for r in planner.waiting] == [2]
        else:
            assert not plan.admitted and [r.id for r in planner.waiting] == [3]
        shard.run(plan)
        drive(planner, shard)
        assert all(r.generated == expected(r) for r in [*background, urgent])
