"""The batching loop over a fake shard: budgets, chunked prefill, prefix cache, preemption, cancellation."""

from __future__ import annotations

import asyncio
import itertools
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.errors import ShardsUnavailable
from router.planner import DECODE_BLOCK_RUN
from router.request import Phase
from tests.router.harness import expected_tokens, fake_router

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def drain(harness, steps: int = 2000) -> None:
    s = harness.scheduler
    for _ in range(steps):
        if not s.waiting and not s.active:
            return
        await s.step()
        harness.check()
    raise AssertionError("requests did not finish")


async def test_chunked_prefill_respects_the_budget_and_finishes(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path, max_batch_prefill_tokens=8) as h:
        long = h.request(prompt(random.Random(1), 30), max_new_tokens=5)
        short = h.request("hello there", max_new_tokens=5)
        h.scheduler.submit(long)
        h.scheduler.submit(short)
        await drain(h)
        assert long.generated == expected_tokens(long)
        assert short.generated == expected_tokens(short)
        prefills = [t for kind, t, _ in h.engine.steps if kind == "prefill"]
        assert max(prefills) <= 8 and sum(prefills) >= len(long.prompt_ids) + len(short.prompt_ids)
        # The long prompt took several chunks, and decode steps ran in between.
        assert len(prefills) >= 4
        assert h.scheduler.allocator.used_blocks == 0


async def test_prefix_cache_reuses_blocks_of_a_shared_prompt(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path) as h:
        system = prompt(random.Random(2), 40)
        first = h.request(system + " first question", max_new_tokens=3)
        h.scheduler.submit(first)
        await drain(h)
        computed_before = sum(t for kind, t, _ in h.engine.steps if kind == "prefill")
        second = h.request(system + " second question", max_new_tokens=3)
        h.scheduler.submit(second)
        await drain(h)
        computed_second = sum(t for kind, t, _ in h.engine.steps if kind == "prefill") - computed_before
        hits = h.scheduler.metrics.prefix_hit_tokens._value.get()
        assert hits >= len(first.prompt_ids) // 2
        assert computed_second == len(second.prompt_ids) - hits
        assert second.generated == expected_tokens(second)


async def test_preemption_resumes_with_the_same_tokens(tokenizer, tmp_path):
    # 12 blocks of 4 tokens: three requests of ~30 tokens cannot all fit.
    async with fake_router(tokenizer, tmp_path, num_blocks=12, max_total_tokens=48) as h:
        rng = random.Random(3)
        requests = [h.request(prompt(rng, 5), max_new_tokens=24, seed=i) for i in range(3)]
        for r in requests:
            h.scheduler.submit(r)
        await drain(h)
        assert h.scheduler.metrics.preemptions._value.get() > 0
        for r in requests:
            assert r.generated == expected_tokens(r)
        assert h.scheduler.allocator.used_blocks == 0


def runs(blocks: list[int]) -> list[int]:
    """Lengths of the runs of consecutive block ids."""
    lengths = [1]
    for before, after in itertools.pairwise(blocks):
        if after == before + 1:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


async def submit_and_step(harness, requests: list, steps: int):
    """Submits ``requests`` and runs ``steps`` scheduler steps, yielding after each (checked)."""
    for r in requests:
        harness.scheduler.submit(r)
    for _ in range(steps):
        await harness.scheduler.step()
        harness.check()
        yield


async def test_decoding_requests_grow_by_runs_of_contiguous_blocks(tokenizer, tmp_path):
    # Four streams decoding side by side with room to spare: each takes its output's blocks
    # DECODE_BLOCK_RUN at a time (never past what its length limit can fill), not one block
    # between each of the others'; the tokens are those of an uninterrupted run.
    async with fake_router(tokenizer, tmp_path, num_blocks=256, max_total_tokens=400) as h:
        rng = random.Random(7)
        requests = [h.request(prompt(rng, 5), max_new_tokens=40, seed=i) for i in range(4)]
        async for _ in submit_and_step(h, requests, 30):
            pass
        for r in requests:
            final_blocks = h.scheduler.allocator.blocks_for(len(r.prompt_ids) + r.max_new_tokens - 1)
            assert len(r.blocks) <= final_blocks
            prompt_blocks = h.scheduler.allocator.blocks_for(len(r.prompt_ids))
            assert max(runs(r.blocks[prompt_blocks:])) >= DECODE_BLOCK_RUN > 1
        await drain(h)
        for r in requests:
            assert r.generated == expected_tokens(r)
        assert h.scheduler.allocator.used_blocks == 0


async def test_decode_block_runs_yield_to_a_tight_cache(tokenizer, tmp_path):
    # 12 blocks of 4 tokens for three streams: no block is taken ahead of need, so the
    # runs never cause a preemption a block at a time would not.
    async with fake_router(tokenizer, tmp_path, num_blocks=12, max_total_tokens=48) as h:
        rng = random.Random(4)
        requests = [h.request(prompt(rng, 3), max_new_tokens=8, seed=i) for i in range(3)]
        async for _ in submit_and_step(h, requests, 6):
            for r in h.scheduler.active:
                assert len(r.blocks) <= h.scheduler.allocator.blocks_for(r.computed + 2)  # a step ahead at most
        await drain(h)
        for r in requests:
            assert r.generated == expected_tokens(r)


async def test_cancel_frees_blocks_at_the_next_step(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path) as h:
        r = h.request("a long story", max_new_tokens=100)
        h.scheduler.submit(r)
        for _ in range(3):
            await h.scheduler.step()
        assert h.scheduler.allocator.used_blocks > 0
        h.scheduler.cancel(r)
        await h.scheduler.step()
        h.check()
        assert r.phase is Phase.FINISHED and h.scheduler.allocator.used_blocks == 0
        assert not h.engine.store.sequences  # the shard forgot it too


async def test_shard_failure_fails_requests_and_keeps_serving(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path) as h:
        loop = asyncio.create_task(h.scheduler.run())
        try:
            h.engine.fail_next_step = True
            doomed = h.request("first", max_new_tokens=50)
            h.scheduler.submit(doomed)
            events: list = []
            while not events or (events[-1].error is None and events[-1].finish_reason is None):
                events.append(await asyncio.wait_for(doomed.events.get(), 5))
            assert events[-1].error is not None and "fault id" in str(events[-1].error)
            assert h.scheduler.allocator.used_blocks == 0
            fine = h.request("second", max_new_tokens=4)
            h.scheduler.submit(fine)
            while (event := await asyncio.wait_for(fine.events.get(), 5)).finish_reason is None:
                assert event.error is None
            assert fine.generated == expected_tokens(fine)
        finally:
            loop.cancel()


async def _collect(r, timeout_s: float = 10.0) -> list:
    events: list = []
    while not events or (events[-1].error is None and events[-1].finish_reason is None):
        events.append(await asyncio.wait_for(r.events.get(), timeout_s))
    return events


async def test_a_shard_restart_mid_stream_is_invisible_to_callers(tokenizer, tmp_path):
    """The shard dies with requests prefilling and decoding: every stream continues with the tokens of
    an uninterrupted run (recomputed on the new shard), and no caller sees an error."""
    async with fake_router(tokenizer, tmp_path, num_blocks=64, max_batch_prefill_tokens=8) as h:
        loop = asyncio.create_task(h.scheduler.run())
        try:
            rng = random.Random(7)
            requests = [h.request(prompt(rng, 6 + 4 * i), max_new_tokens=30, seed=i) for i in range(4)]
            collectors = []
            for r in requests:
                h.scheduler.submit(r)
                collectors.append(asyncio.create_task(_collect(r)))
            while not any(len(r.generated) >= 5 for r in requests):
                await asyncio.sleep(0.001)
            assert all(len(r.generated) < 30 for r in requests)  # all in flight when the shard dies
            await h.restart_shard(down_s=0.3)
            for r, events in zip(requests, await asyncio.gather(*collectors), strict=True):
                assert all(e.error is None for e in events), [e.error for e in events if e.error]
                assert events[-1].finish_reason == "length"
                assert r.generated == expected_tokens(r)
                assert [t.id for e in events for t in e.tokens] == r.generated  # nothing repeated or missing
            assert h.scheduler.metrics.shard_recoveries._value.get() == 1
            assert h.engine.warm and h.scheduler.allocator.used_blocks == 0
            await h.scheduler.check_shards()  # healthy again
        finally:
            loop.cancel()


async def test_an_idle_router_warms_a_restarted_shard(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path) as h:
        loop = asyncio.create_task(h.scheduler.run())
        try:
            await h.restart_shard()
            with pytest.raises(ShardsUnavailable):
                await h.scheduler.check_shards()
            for _ in range(50):
                if h.engine.warm and h.scheduler.unavailable is None:
                    break
                await asyncio.sleep(0.1)
            await h.scheduler.check_shards()
            r = h.request("after the restart", max_new_tokens=4)
            h.scheduler.submit(r)
            events = await _collect(r)
            assert events[-1].finish_reason == "length" and r.generated == expected_tokens(r)
        finally:
            loop.cancel()


async def test_requests_fail_cleanly_when_the_shard_stays_away(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path) as h:
        h.scheduler.recovery_timeout_s = 0.5
        loop = asyncio.create_task(h.scheduler.run())
        try:
            await h.shard.stop()
            r = h.request("a story", max_new_tokens=20)
            h.scheduler.submit(r)
            events = await _collect(r)
            assert isinstance(events[-1].error, ShardsUnavailable)
            assert "did not recover within" in str(events[-1].error)
            await h.shard.start(h.engine)  # the same process again: warm, same instance id
            for _ in range(50):
                if h.scheduler.unavailable is None:
                    break
                await asyncio.sleep(0.1)
            late = h.request("later", max_new_tokens=3)
            h.scheduler.submit(late)
            assert (await _collect(late))[-1].finish_reason == "length"
        finally:
            loop.cancel()


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.integers(1, 40), st.integers(1, 30)),
        st.tuples(st.just("step"), st.integers(1, 4), st.just(0)),
        st.tuples(st.just("cancel"), st.integers(0, 50), st.just(0)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops, num_blocks=st.integers(12, 40), prefill_budget=st.integers(4, 64), seed=st.integers(0, 1000))
def test_random_traffic_keeps_invariants(tokenizer, ops, num_blocks, prefill_budget, seed):
    """Random arrive / step / cancel sequences: invariants after every operation, nothing leaked at the end."""

    async def scenario(sockets: Path) -> None:
        rng = random.Random(seed)
        async with fake_router(
            tokenizer, sockets, num_blocks=num_blocks, max_total_tokens=48, max_batch_prefill_tokens=prefill_budget
        ) as h:
            submitted = []
            shared = prompt(rng, 8)  # some prompts share a prefix, to exercise the cache
            for op, a, b in ops:
                if op == "arrive":
                    text = (shared + " " if a % 2 else "") + prompt(rng, min(a % 9 + 1, 10))
                    room = 48 - len(tokenizer.encode(text, add_special_tokens=True))
                    if room < 1:
                        continue
                    r = h.request(text, max_new_tokens=min(b, room))
                    submitted.append(r)
                    h.scheduler.submit(r)
                elif op == "step":
                    for _ in range(a):
                        await h.scheduler.step()
                        h.check()
                elif submitted:
                    h.scheduler.cancel(submitted[a % len(submitted)])
                h.check()
            await drain(h)
            assert h.scheduler.allocator.used_blocks == 0
            assert not h.engine.store.sequences
            for r in submitted:
                if not r.cancelled:
                    assert r.generated == expected_tokens(r)

    with tempfile.TemporaryDirectory() as sockets:
        asyncio.run(scenario(Path(sockets)))


@pytest.mark.parametrize("concurrency", [256])
async def test_many_concurrent_streams_finish_with_no_blocks_in_use(tokenizer, tmp_path, concurrency):
    async with fake_router(
        tokenizer, tmp_path, num_blocks=512, max_batch_size=64, max_batch_prefill_tokens=256, verify=False
    ) as h:
        loop = asyncio.create_task(h.scheduler.run())
        requests = [h.request(f"request number {i}", max_new_tokens=20, seed=i) for i in range(concurrency)]
        for r in requests:
            h.scheduler.submit(r)

        async def finish(r):
            while (event := await r.events.get()).finish_reason is None:
                assert event.error is None

        await asyncio.wait_for(asyncio.gather(*(finish(r) for r in requests)), 60)
        loop.cancel()
        assert all(r.generated == expected_tokens(r) for r in requests)
        assert h.scheduler.allocator.used_blocks == 0


async def test_arrivals_wait_for_the_ratio_or_max_waiting_tokens(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path, waiting_served_ratio=1.2, max_waiting_tokens=3) as h:
        s = h.scheduler
        running = [h.request(f"runner {i}", max_new_tokens=50) for i in range(2)]
        for r in running:
            s.submit(r)
        await s.step()  # nothing was decoding: admitted at once
        assert all(r.phase is Phase.DECODING for r in running)
        late = h.request("late arrival", max_new_tokens=5)
        s.submit(late)
        waited = 0
        while late.phase is Phase.WAITING:  # 1 waiting < 1.2 * 2 running: decode goes on without it
            await s.step()
            waited += 1
        # ... until max_waiting_tokens (3) decode steps ran since the last admission.
        assert waited == 3 + 1  # three steps of pure decode, admitted (mixed into decode) at the fourth
        crowd = [h.request(f"crowd {i}", max_new_tokens=5) for i in range(4)]
        for r in crowd:
            s.submit(r)
        await s.step()  # 4 waiting >= 1.2 * 3 running: admitted at the next step
        assert all(r.phase is not Phase.WAITING for r in crowd)


async def test_a_prompt_arriving_during_decode_rides_in_the_same_call(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path) as h:
        s = h.scheduler
        first = h.request("the first request", max_new_tokens=6)
        s.submit(first)
        await s.step()  # nothing decodes yet: a plain Prefill
        second = h.request("a second request arrives", max_new_tokens=4)
        s.submit(second)
        await s.step()  # one Decode call: first's next token and second's whole prompt
        assert h.engine.calls == ["prefill", "decode"]
        assert h.engine.steps[-2:] == [("prefill", len(second.prompt_ids), 1), ("decode", 1, 1)]
        assert len(first.generated) == 2 and len(second.generated) == 1
        await drain(h)
        assert first.generated == expected_tokens(first) and second.generated == expected_tokens(second)
        assert h.engine.calls.count("prefill") == 1  # every later step was a single Decode


async def test_kv_gauges_are_right_before_the_first_request(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path, num_blocks=40) as h:
        assert h.scheduler.metrics.blocks_free._value.get() == 40
        assert h.scheduler.metrics.blocks_used._value.get() == 0
