"""The router's lookahead: the next Decode sent before the answer to the one before it.

What must hold: the same tokens as stepping one call at a time (the fake shard checks
every KV slot a request reads), no token past a request's end reaches its caller, and
the shard runs a pipelined call only after the call it follows.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from protos import router_pb2 as rpb
from protos import shard_pb2 as pb
from router.request import Phase, Request
from shard import server as shard_server
from shard.config import ShardConfig
from shard.server import ShardServicer
from tests.fake_engine import FakeEngine
from tests.router.harness import Harness, expected_tokens, fake_router


def record_decodes(h: Harness) -> list[tuple[int, int]]:
    """(step, after_step) of every Decode the router sends from now on."""
    sent: list[tuple[int, int]] = []
    decode = h.scheduler.shards.decode

    async def spy(batch_ids, extensions, chunks=(), step=0, after_step=0):  # type: ignore[no-untyped-def]
        sent.append((step, after_step))
        return await decode(batch_ids, extensions, chunks, step, after_step)

    h.scheduler.shards.decode = spy  # type: ignore[method-assign]
    return sent


async def drain(h: Harness) -> None:
    s = h.scheduler
    for _ in range(1000):
        if not s.waiting and not s.active and s._ahead is None:
            return
        await s.step()
        h.check()
    raise AssertionError("requests did not finish")


async def test_steady_decoding_is_pipelined_and_gives_the_same_tokens(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path) as h:
        sent = record_decodes(h)
        requests = [h.request(f"story number {i}", max_new_tokens=n) for i, n in enumerate((12, 12, 7))]
        for r in requests:
            h.scheduler.submit(r)
        await drain(h)
        for r in requests:
            assert r.generated == expected_tokens(r)
        ahead = [(step, after) for step, after in sent if after]
        assert len(ahead) >= 8, sent
        assert all(after == step - 1 for step, after in ahead)  # each follows the call sent just before it
        assert h.scheduler.allocator.used_blocks == 0
        assert not h.engine.store.sequences


async def test_no_lookahead_past_a_request_ending_by_length(tokenizer, tmp_path):
    """A request at its last token by max_tokens stops the pipeline: no token is computed for nothing."""
    async with fake_router(tokenizer, tmp_path) as h:
        r = h.request("just a few", max_new_tokens=5)
        h.scheduler.submit(r)
        await drain(h)
        assert r.generated == expected_tokens(r)
        decoded = [kind for kind, _, sequences in h.engine.steps if kind == "decode" and sequences]
        assert len(decoded) == 4  # the prefill gives the first token, four decodes the rest


def stop_text_of(h: Harness, r: Request, index: int) -> str | None:
    """A stop string that ends ``r``'s output at token ``index`` (None if its text shows up earlier)."""
    tokens = expected_tokens(r)
    word = h.scheduler.tokenizer.decode(tokens[index : index + 1], skip_special_tokens=True).strip()
    before = h.scheduler.tokenizer.decode(tokens[:index], skip_special_tokens=True)
    return word if len(word) >= 3 and word not in before else None


async def test_a_stop_string_mid_pipeline_ends_the_stream_with_no_extra_token(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path) as h:
        record_decodes(h)
        for salt in range(50):
            probe = h.request(f"tell me about {salt}", max_new_tokens=12)
            stop = stop_text_of(h, probe, 6)
            if stop is not None:
                break
        else:
            pytest.skip("no distinctive token to stop on")
        params = rpb.GenerationParameters(max_new_tokens=12, seed=0, ignore_eos=True, temperature=0, stop=[stop])
        asked = rpb.GenerateRequest(prompt=f"tell me about {salt}", parameters=params)
        stopping = h.validator.request(next(h.ids), asked)
        other = h.request("a longer tale", max_new_tokens=14)
        h.scheduler.submit(stopping)
        h.scheduler.submit(other)
        await drain(h)
        assert stopping.generated == expected_tokens(stopping)[:7]  # up to the stop string, nothing after
        events = []
        while not stopping.events.empty():
            events.append(stopping.events.get_nowait())
        assert events[-1].finish_reason == "stop_sequence"
        assert sum(len(e.tokens) for e in events) == 7
        assert other.generated == expected_tokens(other)
        assert h.scheduler.allocator.used_blocks == 0


async def test_cancel_while_a_lookahead_is_in_flight(tokenizer, tmp_path):
    async with fake_router(tokenizer, tmp_path) as h:
        leaving = h.request("a long story", max_new_tokens=40)
        staying = h.request("another long story", max_new_tokens=20)
        h.scheduler.submit(leaving)
        h.scheduler.submit(staying)
        for _ in range(6):
            await h.scheduler.step()
        assert h.scheduler._ahead is not None
        h.scheduler.cancel(leaving)
        await drain(h)
        assert leaving.phase is Phase.FINISHED and len(leaving.generated) < 40
        assert staying.generated == expected_tokens(staying)
        assert h.scheduler.allocator.used_blocks == 0 and not h.engine.store.sequences


class _Aborted(Exception):
    pass


class _Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


def _servicer(tmp_path) -> ShardServicer:
    config = ShardConfig(None, None, "cpu", 0, 1, str(tmp_path / "shard"), None, 4, 0.1)
    return ShardServicer(FakeEngine(8), config, "fake", "FakeForCausalLM")  # type: ignore[arg-type]


async def test_the_shard_runs_a_pipelined_decode_after_the_call_it_follows(tmp_path):
    servicer, ran = _servicer(tmp_path), []
    second = asyncio.create_task(
        servicer._decode_in_order(pb.DecodeRequest(step=8, after_step=7), _Context(), lambda: ran.append(8))
    )
    await asyncio.sleep(0.05)  # arrived first: it must wait
    assert ran == []
    await servicer._decode_in_order(pb.DecodeRequest(step=7), _Context(), lambda: ran.append(7))
    await second
    assert ran == [7, 8]


async def test_a_pipelined_decode_whose_predecessor_never_comes_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_server, "STEP_ORDER_TIMEOUT_S", 0.1)
    servicer, ran = _servicer(tmp_path), []
    with pytest.raises(_Aborted) as failure:
        await servicer._decode_in_order(pb.DecodeRequest(step=3, after_step=2), _Context(), lambda: ran.append(3))
    assert failure.value.args[0] is grpc.StatusCode.FAILED_PRECONDITION
    assert ran == []
