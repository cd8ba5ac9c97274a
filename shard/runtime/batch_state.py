"""Sequences living in a shard between steps, grouped into batches by id.

A batch is only a list of request ids; merging (Decode over several batches) and
filtering are list operations. The router decides who is in which batch; the
shard checks what it is told and refuses what it cannot honour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shard.numerics.sampling import SamplingParams
from shard.runtime.errors import InvalidRequest
from shard.runtime.pooling import PooledRows


@dataclass
class Sequence:
    request_id: int
    #: Every token of the sequence: prompt, then sampled tokens.
    token_ids: list[int]
    #: KV block table (router-owned ids).
    blocks: list[int]
    #: Leading tokens whose KV is in the cache.
    computed: int
    params: SamplingParams
    #: Tokens sampled so far; the index of the next one in the random stream.
    sampled: int
    #: True once the prompt is fully computed and a sampled token awaits its KV:
    #: from then on Decode advances it. (One prompt token left to compute is not
    #: the same thing: that is still a prefill chunk.)
    decoding: bool = False
    #: xgrammar matcher when the output is constrained; advanced by every sampled token.
    matcher: Any = None
    #: Score the input tokens the current chunk predicts (Request.score_inputs).
    score_inputs: bool = False
    #: For an embedding request: the final hidden states its pooling keeps (shard.runtime.pooling).
    pooled: PooledRows | None = None
    #: Speculative guesses for the tokens after the pending one, this step only (DecodeRequest.guesses),
    #: and how many of them verification kept.
    guesses: list[int] = field(default_factory=list)
    accepted: int = 0
    #: For a constrained request with guesses: the grammar state of each verification row.
    row_matchers: list[Any] = field(default_factory=list)
    #: Leading positions whose draft-model KV is in the draft cache (shard.runtime.drafter), and the
    #: end of the positions the draft wrote this step (0: it did not run for this sequence).
    drafted: int = 0
    draft_end: int = 0
    #: The LoRA adapter its rows use (shard.numerics.lora.Adapter); None: the base model.
    adapter: Any = None

    def inputs(self, start: int, end: int) -> list[int]:
        """Input tokens of positions [start, end): known tokens, then this step's guesses."""
        known = self.token_ids[start:end]
        if end <= len(self.token_ids):
            return known
        return known + self.guesses[: end - max(start, len(self.token_ids))]


class BatchStore:
    def __init__(self) -> None:
        self.sequences: dict[int, Sequence] = {}
        self.batches: dict[int, list[int]] = {}

    def get(self, batch_id: int) -> list[int]:
        if batch_id not in self.batches:
            raise InvalidRequest(f"unknown batch id {batch_id}", not_found=True)
        return self.batches[batch_id]

    def add(self, batch_id: int, sequence: Sequence) -> None:
        """Adds a new sequence, or returns the existing one's next chunk to the batch."""
        members = self.batches.setdefault(batch_id, [])
        if sequence.request_id not in members:
            members.append(sequence.request_id)
        self.sequences[sequence.request_id] = sequence

    def merge(self, batch_ids: list[int]) -> int:
        """Merges the batches into the first one; returns its id."""
        if not batch_ids:
            raise InvalidRequest("Decode needs at least one batch")
        head = batch_ids[0]
        merged = list(self.get(head))
        for other in batch_ids[1:]:
            merged.extend(self.get(other))
            if other != head:
                del self.batches[other]
        self.batches[head] = merged
        return head

    def filter(self, batch_id: int, keep: list[int]) -> list[int]:
        members = self.get(batch_id)
        wanted = set(keep)
        unknown = wanted - set(members)
        if unknown:
            raise InvalidRequest(f"requests {sorted(unknown)} are not in batch {batch_id}")
        self.drop(batch_id, [r for r in members if r not in wanted])
        if not self.batches[batch_id]:
            del self.batches[batch_id]
        return self.batches.get(batch_id, [])

    def drop(self, batch_id: int, gone: list[int]) -> list[Sequence]:
        """Forgets the ``gone`` requests of the batch; returns the members left (the batch
        stays, empty or not, for the step's prompt chunks to join)."""
        members = self.get(batch_id)
        unknown = set(gone) - set(members)
        if unknown:
            raise InvalidRequest(f"requests {sorted(unknown)} are not in batch {batch_id}")
        if gone:
            dropped = set(gone)
            for request_id in dropped:
                self.sequences.pop(request_id, None)
            members = self.batches[batch_id] = [r for r in members if r not in dropped]
        return [self.sequences[r] for r in members]

    def clear(self, batch_id: int | None) -> None:
        ids = list(self.batches) if batch_id is None else [batch_id]
        for bid in ids:
            for request_id in self.batches.pop(bid, []):
                self.sequences.pop(request_id, None)

    def members(self, batch_id: int) -> list[Sequence]:
        return [self.sequences[r] for r in self.get(batch_id)]
