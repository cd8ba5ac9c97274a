"""Pipelined steps: step N+1 goes to the shard before step N's answer is in.

The fake shard checks, before every step, that each request's KV really is in its
blocks, and its tokens depend only on the sequence, so any mistake in planning a
step ahead (a block missing, a finished request still advanced, KV overwritten)
shows as an error or a wrong token.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from common import sampling_params
from common.sampling_params import SamplingParams
from protos import router_pb2 as rpb
from protos import shard_pb2 as pb
from router.request import Phase, Request, StreamEvent
from shard.config import ShardConfig
from shard.runtime.errors import CapacityError, InvalidRequest
from shard.runtime.server import ShardServicer
from shard.runtime.step_order import StepOrder
from support.fake_engine import FakeEngine
from tests.router.harness import expected_tokens, fake_router


def record_orders(harness) -> list[int]:
    """The after_step_id of every Decode the router sends (0: not pipelined)."""
    shards = harness.scheduler.shards
    sent: list[int] = []
    plain = shards.decode

    async def decode(batch_ids, extensions, order):
        sent.append(order.after_step_id)
        return await plain(batch_ids, extensions, order)

    shards.decode = decode
    return sent


class ChunkLog(FakeEngine):
    """Records, per decode step the model thread runs, the requests whose prompt chunks it carries."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunks: list[list[int]] = []

    def decode(self, batch_ids, extensions, chunks=None, drop=None, guesses=None, drafts=None):
        self.chunks.append([c.request_id for c in chunks or []])
        return super().decode(batch_ids, extensions, chunks, drop, guesses, drafts)


async def test_an_arrival_joins_the_step_after_the_one_computing(tokenizer, tmp_path):
    """With steps of 40 ms the step sent ahead goes out late, so a request arriving while a
    step computes rides in the very next one instead of the one after it."""
    engine = ChunkLog(64, 4, step_s=0.04)
    async with fake_router(tokenizer, tmp_path, engine=engine) as h:
        loop = asyncio.create_task(h.scheduler.run())
        try:
            first = h.request("a long running stream", max_new_tokens=12)
            h.scheduler.submit(first)
            for _ in range(5):  # a few steps in: the step time is known
                await asyncio.wait_for(first.events.get(), 10)
            await asyncio.sleep(0.01)  # into the step computing now
            computing = len(engine.chunks)  # the steps started so far, this one included
            late = h.request("a late arrival", max_new_tokens=3)
            h.scheduler.submit(late)
            await collect(late)
            await collect(first)
            await settled(h)
        finally:
            loop.cancel()
        carried_by = [i for i, chunks in enumerate(engine.chunks) if late.id in chunks]
        assert carried_by == [computing], engine.chunks
        assert first.generated == expected_tokens(first) and late.generated == expected_tokens(late)


async def settled(harness) -> None:
    """Waits for the loop to go idle after the last event (it then clears the shard's batch)."""
    for _ in range(200):
        if harness.scheduler.steps.sent is None and not harness.engine.store.sequences:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the shard still holds sequences")


async def collect(r: Request) -> list[StreamEvent]:
    events = []
    while True:
        events.append(await asyncio.wait_for(r.events.get(), 30))
        if events[-1].finish_reason is not None or events[-1].error is not None:
            return events


async def test_one_stream_decodes_back_to_back_with_the_same_tokens(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path, engine=FakeEngine(64, 4, step_s=0.01)) as h:
        sent = record_orders(h)
        loop = asyncio.create_task(h.scheduler.run())
        try:
            r = h.request("a lone stream", max_new_tokens=30)
            h.scheduler.submit(r)
            events = await collect(r)
            await settled(h)
        finally:
            loop.cancel()
        assert events[-1].finish_reason == "length"
        assert r.generated == expected_tokens(r)
        # The first decode follows the prefill; every later one is sent ahead of the
        # answer before it, and none after the last token (its end is known from max_new_tokens).
        assert len(sent) == 29 and sent[0] == 0 and all(sent[1:])
        assert h.scheduler.allocator.used_blocks == 0 and not h.engine.store.sequences


async def test_a_stop_sequence_found_one_step_late_costs_one_dropped_token(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path) as h:
        loop = asyncio.create_task(h.scheduler.run())
        try:
            probe = h.request("the stop string comes from here", max_new_tokens=12)
            text = tokenizer.decode(expected_tokens(probe)[4:], skip_special_tokens=True)
            stop = text.strip()[:3]
            params = rpb.GenerationParameters(max_new_tokens=12, seed=0, ignore_eos=True, temperature=0, stop=[stop])
            stopped = h.validator.request(
                next(h.ids), rpb.GenerateRequest(prompt="the stop string comes from here", parameters=params)
            )
            others = [h.request(f"a neighbour {i}", max_new_tokens=20, seed=i) for i in range(3)]
            for r in [stopped, *others]:
                h.scheduler.submit(r)
            results = await asyncio.gather(*(collect(r) for r in [stopped, *others]))
            await settled(h)
        finally:
            loop.cancel()
        assert results[0][-1].finish_reason == "stop_sequence"
        assert stop not in "".join(e.text for e in results[0])
        assert stopped.generated == expected_tokens(stopped)[: len(stopped.generated)]
        assert len(stopped.generated) < 12
        for r, events in zip(others, results[1:], strict=True):
            assert events[-1].finish_reason == "length" and r.generated == expected_tokens(r)
        assert h.scheduler.allocator.used_blocks == 0 and not h.engine.store.sequences


@pytest.mark.parametrize("seed", range(4))
async def test_random_traffic_under_the_running_loop(tokenizer, tmp_path, seed):
    """Arrivals, cancellations and KV pressure (preemption) with pipelining on: every
    finished request has its uninterrupted tokens, nothing leaks."""
    rng = random.Random(seed)
    engine = FakeEngine(30, 4, step_s=0.002)
    async with fake_router(
        tokenizer, tmp_path, num_blocks=30, max_total_tokens=60, max_batch_prefill_tokens=16, engine=engine
    ) as h:
        sent = record_orders(h)
        loop = asyncio.create_task(h.scheduler.run())
        try:
            requests = []
            for i in range(24):
                r = h.request(f"request {i} " + "word " * rng.randint(1, 12), max_new_tokens=rng.randint(1, 30))
                requests.append(r)
                h.scheduler.submit(r)
                if rng.random() < 0.2:
                    h.scheduler.cancel(requests[rng.randrange(len(requests))])
                await asyncio.sleep(rng.random() * 0.01)
            live = [r for r in requests if not r.cancelled]
            results = await asyncio.gather(*(collect(r) for r in live))
            await settled(h)
        finally:
            loop.cancel()
        for r, events in zip(live, results, strict=True):
            if not r.cancelled:
                assert events[-1].finish_reason == "length", events[-1]
                assert r.generated == expected_tokens(r)
        assert any(sent), "no step was pipelined"
        h.check()
        assert h.scheduler.allocator.used_blocks == 0


async def test_pipelining_off_sends_every_step_after_the_answer(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path) as h:
        h.scheduler.pipeline = False
        sent = record_orders(h)
        loop = asyncio.create_task(h.scheduler.run())
        try:
            r = h.request("not pipelined", max_new_tokens=10)
            h.scheduler.submit(r)
            await collect(r)
        finally:
            loop.cancel()
        assert r.generated == expected_tokens(r) and sent == [0] * 9


# --- the shard's side ---------------------------------------------------------------


async def test_a_follower_arriving_first_waits_for_its_predecessor():
    order = StepOrder()
    ran: list[str] = []

    async def call(name: str, step_id: int, after: int) -> None:
        await order.after(after)
        ran.append(name)
        order.handed(step_id)

    follower = asyncio.create_task(call("second", 8, 7))
    await asyncio.sleep(0.01)
    assert ran == []
    await call("first", 7, 0)
    await follower
    assert ran == ["first", "second"]
    await call("third", 9, 8)  # its predecessor is already known: no wait
    assert ran[-1] == "third"


async def test_a_follower_whose_predecessor_never_comes_fails_cleanly():
    order = StepOrder(wait_s=0.05)
    with pytest.raises(CapacityError, match="did not arrive"):
        await order.after(41)


def _decode(step_id: int, after: int, drop: list[int] = ()) -> pb.DecodeRequest:  # type: ignore[assignment]
    return pb.DecodeRequest(batches=[pb.CachedBatch(id=1)], step_id=step_id, after_step_id=after, drop=drop)


async def test_the_servicer_runs_pipelined_decodes_in_the_routers_order(tmp_path):
    engine = FakeEngine(16)
    engine.warmup(16, 4, 0)
    config = ShardConfig(None, None, "cpu", 0, 1, str(tmp_path / "shard"), None, 4, 0.1)
    servicer = ShardServicer(engine, config, "fake", "FakeForCausalLM")
    greedy = sampling_params.to_pb(SamplingParams())
    request = pb.Request(id=5, input_ids=[1, 2, 3], cache_len=0, chunk_len=3, blocks=[0, 1], parameters=greedy)
    await servicer.Prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request])), None)
    # Step 11 arrives before step 10, which it follows: it still runs second.
    late = asyncio.create_task(servicer.Decode(_decode(11, 10), None))
    await asyncio.sleep(0.01)
    assert engine.calls == ["prefill"]
    first = await servicer.Decode(_decode(10, 0), None)
    second = await late
    assert engine.calls == ["prefill", "decode", "decode"]
    assert [g.request_id for g in first.generations] == [5] == [g.request_id for g in second.generations]
    assert engine.store.sequences[5].token_ids[4:] == [first.generations[0].token_id, second.generations[0].token_id]
    # A drop folded into the step forgets the request before computing.
    dropped = await servicer.Decode(_decode(12, 11, drop=[5]), None)
    assert not dropped.generations and 5 not in engine.store.sequences
    with pytest.raises(InvalidRequest, match="not in batch"):
        await servicer.Decode(_decode(13, 12, drop=[6]), None)


@pytest.mark.parametrize("pipeline", [True, False])
async def test_a_cancel_between_steps_leaves_the_gauges_and_the_shard_empty(tokenizer, tmp_path, pipeline):
    """A stream cancelled as it takes a token: the loop finds it at its next plan, with no
    step in flight, and goes idle; the KV gauges and the shard's batch must say so then
    (the playground's Stop reads them)."""
    async with fake_router(tokenizer, tmp_path, engine=FakeEngine(64, 4, step_s=0.005)) as h:
        h.scheduler.pipeline = pipeline
        loop = asyncio.create_task(h.scheduler.run())
        try:
            r = h.request("a stream stopped by its reader", max_new_tokens=100)
            h.scheduler.submit(r)
            for _ in range(3):
                await asyncio.wait_for(r.events.get(), 10)
            h.scheduler.cancel(r)
            await settled(h)
            # The shard empties before the loop, back from that call, updates the gauges: give
            # it a moment (a loop gone idle without the update leaves them stale for good).
            metrics = h.scheduler.metrics
            for _ in range(200):
                if metrics.blocks_used._value.get() == 0 and metrics.batch_size._value.get() == 0:
                    break
                await asyncio.sleep(0.01)
        finally:
            loop.cancel()
        assert r.phase is Phase.FINISHED and h.scheduler.allocator.used_blocks == 0
        assert metrics.blocks_used._value.get() == 0 and metrics.batch_size._value.get() == 0
