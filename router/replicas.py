"""Many model replicas behind one router: cache-aware placement and failover.

Each replica (one shard, or one tensor-parallel group of shards) has its own
Scheduler: its own continuous-batching loop, KV block allocator and prefix
cache, budgets and preemption. The ReplicaSet places each request on one of
them and moves requests off a replica that fails.

Placement uses what only the router knows, the replicas' prefix caches: a
request goes to the replica holding the longest cached prefix of its prompt
(shared system prompts are computed once per replica, not once per request),
provided that prefix is at least half the prompt and that replica is not busier
than the least-loaded one by more than ``load_margin`` (load: tokens held and
queued over KV capacity); otherwise the least-loaded one takes it (among equals,
in turn). A replica that is recovering takes nothing; its
requests move to the others and are recomputed there (as after a preemption).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from router.blocks import prefix_chain
from router.errors import Overloaded, ShardsUnavailable
from router.metrics import RouterMetrics
from router.request import Request
from router.scheduler import Scheduler
from router.shard_client import ShardClient

log = logging.getLogger(__name__)

#: PLACEMENT_LOAD_MARGIN: how much busier (share of KV capacity) the cache-best replica may be.
DEFAULT_LOAD_MARGIN = 0.1
#: PLACEMENT_POLICY values: cache_aware (below), least_loaded, round_robin (for comparison).
POLICIES = ("cache_aware", "least_loaded", "round_robin")
#: The share of a prompt a replica must hold cached to be chosen for it over the least-loaded one
#: (as SGLang's cache-aware router's threshold).
MIN_CACHED_SHARE = 0.5


@dataclass
class Replica:
    name: str
    scheduler: Scheduler

    @property
    def available(self) -> bool:
        return self.scheduler.unavailable is None


class ReplicaSet:
    """The replicas one router drives; with one replica, exactly that replica's scheduler."""

    def __init__(
        self,
        replicas: list[Replica],
        load_margin: float = DEFAULT_LOAD_MARGIN,
        policy: str = "cache_aware",
        max_per_replica: int | None = None,
    ):
        if not replicas:
            raise ValueError("a router needs at least one replica")
        if policy not in POLICIES:
            raise ValueError(f"unknown placement policy {policy!r}: one of {POLICIES}")
        self.replicas = replicas
        self.load_margin = load_margin
        self.policy = policy
        #: MAX_CONCURRENT_REQUESTS: a replica holding this many takes no more (429 when all do).
        self.max_per_replica = max_per_replica
        self._owner: dict[int, Replica] = {}  # request id -> the replica serving it
        #: Turns among equally loaded replicas (round robin when nothing else tells them apart).
        self._turn = 0
        #: Per replica, the prompt blocks (chain hashes) of requests placed there recently: their KV
        #: will be cached once computed, so a burst of requests sharing a prompt goes to one place
        #: before the first of them has been computed.
        self._placed: dict[str, OrderedDict[int, None]] = {r.name: OrderedDict() for r in replicas}
        self._loops: list[asyncio.Task[None]] = []
        #: Refusals counted before placement (validation, overload) when there are several replicas.
        self._router_metrics = RouterMetrics()
        for replica in replicas:
            replica.scheduler.hand_off = self._hand_off_from(replica)

    @property
    def front_metrics(self) -> RouterMetrics:
        """Where refusals before placement are counted: the one replica's series, or the router's own."""
        return self.replicas[0].scheduler.metrics if len(self.replicas) == 1 else self._router_metrics

    # --- the API's calls ------------------------------------------------------------

    @property
    def shard_clients(self) -> list[ShardClient]:
        return [r.scheduler.shards for r in self.replicas]

    def uses_adapter(self, name: str) -> bool:
        """Whether a request of any replica, running or waiting, generates with adapter ``name``."""
        planners = [r.scheduler.planner for r in self.replicas]
        return any(req.adapter == name for p in planners for req in (*p.active, *p.waiting))

    def submit(self, request: Request) -> None:
        if len(self.replicas) == 1:  # nothing to choose: no hashing on the common path
            replica = self.replicas[0]
        else:
            chain = self._chain(request)
            replica = self.place(request, chain)
            request.uncached_at_placement = len(request.prompt_ids) - self._cached_tokens(replica, chain)
            self._remember(replica, chain)
        self._owner[request.id] = replica
        request.replica = replica.name
        replica.scheduler.submit(request)

    def cancel(self, request: Request) -> None:
        replica = self._owner.get(request.id)
        if replica is not None:
            replica.scheduler.cancel(request)

    def finished(self, request: Request) -> None:
        self._owner.pop(request.id, None)

    async def check_shards(self) -> None:
        """Serving while any replica is; ShardsUnavailable (with the first reason) when none is."""
        problems = []
        for replica in self.replicas:
            try:
                await replica.scheduler.check_shards()
                return
            except ShardsUnavailable as exc:
                problems.append(f"replica {replica.name}: {exc}" if len(self.replicas) > 1 else str(exc))
        raise ShardsUnavailable("; ".join(problems))

    async def run(self) -> None:
        """Runs every replica's loop, and those of replicas added meanwhile (``add``)."""
        self._loops = [asyncio.create_task(r.scheduler.run()) for r in self.replicas]
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            for task in self._loops:
                task.cancel()

    def add(self, replica: Replica) -> None:
        """A replica that joined at run time (discovered, or up after the router): it takes requests now."""
        self.replicas.append(replica)
        self._placed[replica.name] = OrderedDict()
        replica.scheduler.hand_off = self._hand_off_from(replica)
        self._loops.append(asyncio.create_task(replica.scheduler.run()))
        log.info("replica %s joined: %d replicas", replica.name, len(self.replicas))

    # --- placement --------------------------------------------------------------------

    def place(self, request: Request, chain: list[int] | None = None) -> Replica:
        candidates = [r for r in self.replicas if r.available] or self.replicas
        if self.max_per_replica is not None and len(self.replicas) > 1:  # one: the router's own limit
            candidates = [r for r in candidates if r.scheduler.open_requests < self.max_per_replica]
            if not candidates:
                raise Overloaded(f"every replica holds {self.max_per_replica} requests; retry later")
        if len(candidates) == 1:
            return candidates[0]
        if self.policy == "round_robin":
            self._turn += 1
            return candidates[self._turn % len(candidates)]
        loads = {r.name: r.scheduler.load for r in candidates}
        lowest = min(loads.values())
        tied = [r for r in candidates if loads[r.name] == lowest]
        least = tied[self._turn % len(tied)]
        self._turn += 1
        if self.policy == "least_loaded":
            return least
        chain = self._chain(request) if chain is None else chain
        cached = {r.name: self._cached_tokens(r, chain) for r in candidates}
        best = max(candidates, key=lambda r: (cached[r.name], -loads[r.name]))
        # A cached chat-template preamble alone is no reason to pile every request on one replica.
        worth_it = cached[best.name] >= MIN_CACHED_SHARE * len(request.prompt_ids)
        if worth_it and loads[best.name] - loads[least.name] <= self.load_margin:
            return best
        return least

    def _cached_tokens(self, replica: Replica, chain: list[int]) -> int:
        """Prompt tokens the replica holds cached, or will once the requests placed there are computed."""
        allocator, placed = replica.scheduler.allocator, self._placed[replica.name]
        cached = allocator.cached_prefix_blocks(chain)
        pending = 0
        for h in chain:
            if h not in placed:
                break
            pending += 1
        return max(cached, pending) * allocator.block_size

    def _chain(self, request: Request) -> list[int]:
        """The prompt's block hashes (replicas share one block size: they serve the same model)."""
        return prefix_chain(request.prompt_ids, self.replicas[0].scheduler.allocator.block_size, request.adapter)

    def _remember(self, replica: Replica, chain: list[int]) -> None:
        placed, allocator = self._placed[replica.name], replica.scheduler.allocator
        for h in chain:
            placed[h] = None
            placed.move_to_end(h)
        while len(placed) > allocator.num_blocks:  # no more than the cache could hold
            placed.popitem(last=False)

    def _hand_off_from(self, failed: Replica) -> Callable[[list[Request]], bool]:
        def hand_off(requests: list[Request]) -> bool:
            self._placed[failed.name].clear()  # its cache is gone
            others = [r for r in self.replicas if r is not failed and r.available]
            if not others:
                return False  # nowhere to go: they wait for this replica to come back
            for request in requests:
                target = min(others, key=lambda r: r.scheduler.load)
                self._owner[request.id] = target
                request.replica = target.name
                target.scheduler.resume(request)
            return True

        return hand_off

    # --- metrics ----------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The replicas' metrics; with several, every series carries a ``replica`` label."""
        if len(self.replicas) == 1:
            return self.replicas[0].scheduler.metrics.exposition()
        sources = [(r.name, r.scheduler.metrics.exposition()) for r in self.replicas]
        sources.append(("router", self.front_metrics.refusals_exposition()))
        return merge_expositions(sources)


def merge_expositions(sources: list[tuple[str, bytes]]) -> bytes:
    """Prometheus texts merged family by family, each sample labelled ``replica=<name>``.

    Done on the text, not through prometheus_client's parser, which would rename TGI's
    counters (exposed without ``_total``, as TGI's dashboards query them).
    """
    families: dict[str, list[str]] = {}
    for replica, text in sources:
        family: list[str] | None = None
        for line in text.decode().splitlines():
            if line.startswith("# HELP "):
                name = line.split(" ", 3)[2]
                family = families.get(name)
                if family is None:
                    family = families[name] = [line]
            elif line.startswith("# TYPE "):
                if family is not None and len(family) == 1:
                    family.append(line)
            elif line and family is not None:
                family.append(_with_replica(line, replica))
    return ("\n".join(line for lines in families.values() for line in lines) + "\n").encode()


def _with_replica(sample: str, replica: str) -> str:
    """``name{a="b"} 1`` -> ``name{a="b",replica="r"} 1`` (values are after the last brace)."""
    label = f'replica="{replica}"'
    close = sample.rfind("}")
    if close >= 0:
        return f"{sample[:close]},{label}{sample[close:]}"
    name, _, value = sample.partition(" ")
    return f"{name}{{{label}}} {value}"
