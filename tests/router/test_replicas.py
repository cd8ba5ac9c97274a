"""Placement across replicas, and the replicas' metrics in one exposition."""

from __future__ import annotations

import itertools
from typing import cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos import router_pb2 as pb
from router.blocks import BlockAllocator
from router.config import Limits
from router.recovery import ShardLink, WarmupPlan
from router.replicas import Replica, ReplicaSet, merge_expositions
from router.request import Request
from router.scheduler import Scheduler
from router.shard_client import ShardClient
from router.validation import Validator

LIMITS = Limits(1999, 2000, 512, 8, 1.2, 20)


class Requests:
    """Requests as the API makes them, from token ids."""

    def __init__(self, tokenizer):
        self.validator = Validator(tokenizer, LIMITS, 4)
        self.ids = itertools.count(1)

    def __call__(self, prompt: list[int]) -> Request:
        message = pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=prompt), parameters=pb.GenerationParameters())
        return self.validator.request(next(self.ids), message)


@pytest.fixture
def make(tokenizer) -> Requests:
    return Requests(tokenizer)


def _replica_set(tokenizer, names: tuple[str, ...] = ("0", "1")) -> ReplicaSet:
    """Schedulers that are never run: placement reads their queues, caches and state only."""
    link = ShardLink(cast(ShardClient, None), WarmupPlan(512, 8, 0))
    schedulers = [Scheduler(link, BlockAllocator(64, 16), LIMITS, tokenizer) for _ in names]
    return ReplicaSet([Replica(n, s) for n, s in zip(names, schedulers, strict=True)], load_margin=0.25)


def _cache(replica: Replica, tokens: list[int]) -> None:
    """Registers ``tokens`` in the replica's prefix cache, as a finished prefill would."""
    allocator: BlockAllocator = replica.scheduler.allocator
    blocks = allocator.allocate(allocator.blocks_for(len(tokens)))
    allocator.register(blocks, tokens, len(tokens), (0, None))
    allocator.release(blocks)


def test_equal_replicas_take_turns(tokenizer, make):
    replicas = _replica_set(tokenizer)
    placed = [replicas.place(make([i] * 40)).name for i in range(4)]
    assert placed == ["0", "1", "0", "1"]


def test_a_cached_prompt_goes_home_unless_home_is_much_busier(tokenizer, make):
    replicas = _replica_set(tokenizer)
    prompt = list(range(100, 164))
    _cache(replicas.replicas[1], prompt)
    assert [replicas.place(make([*prompt, 7])).name for _ in range(3)] == ["1", "1", "1"]
    busy = replicas.replicas[1].scheduler
    busy.waiting.extend(make([5] * 400) for _ in range(2))  # 800 of 1024 KV tokens queued
    assert busy.load > 0.25
    assert replicas.place(make([*prompt, 7])).name == "0"


def test_a_short_shared_preamble_does_not_decide(tokenizer, make):
    replicas = _replica_set(tokenizer)
    _cache(replicas.replicas[1], list(range(100, 117)))  # one block in common: under half the prompt
    assert {replicas.place(make([*list(range(100, 140)), i])).name for i in range(4)} == {"0", "1"}


def test_a_recovering_replica_takes_nothing(tokenizer, make):
    replicas = _replica_set(tokenizer)
    replicas.replicas[0].scheduler.unavailable = "restarting"
    assert {replicas.place(make([i] * 20)).name for i in range(4)} == {"1"}


def test_expositions_merge_with_a_replica_label_and_exact_names():
    a = b"# HELP tgi_request_count Total\n# TYPE tgi_request_count counter\ntgi_request_count 3\n"
    b = b"# HELP tgi_request_count Total\n# TYPE tgi_request_count counter\ntgi_request_count 4\n"
    c = b'# HELP x_seconds X\n# TYPE x_seconds histogram\nx_seconds_bucket{le="+Inf"} 1.0\nx_seconds_count 1.0\n'
    merged = merge_expositions([("0", a + c), ("1", b)]).decode()
    assert 'tgi_request_count{replica="0"} 3' in merged and 'tgi_request_count{replica="1"} 4' in merged
    assert merged.count("# TYPE tgi_request_count counter") == 1
    assert 'x_seconds_bucket{le="+Inf",replica="0"} 1.0' in merged
    assert len(list(text_string_to_metric_families(merged))) == 2


async def test_dns_entries_expand_to_every_address_and_others_stay():
    from router.discovery import resolve

    found = await resolve(["dns:localhost:50060", "unix:///tmp/x-0", "shard-0.shard:50060"])
    assert "127.0.0.1:50060" in found and found[-2:] == ["unix:///tmp/x-0", "shard-0.shard:50060"]
    assert await resolve(["dns:no-such-host.invalid:1"]) == []  # not yet: tried again next round


def test_a_full_replica_takes_no_more_and_all_full_is_429(tokenizer, make):
    from router.errors import Overloaded

    replicas = _replica_set(tokenizer)
    replicas.max_per_replica = 2
    replicas.replicas[0].scheduler.waiting.extend([make([1] * 20), make([2] * 20)])
    assert {replicas.place(make([i] * 20)).name for i in range(3, 7)} == {"1"}
    replicas.replicas[1].scheduler.waiting.extend([make([3] * 20), make([4] * 20)])
    with pytest.raises(Overloaded):
        replicas.place(make([5] * 20))
