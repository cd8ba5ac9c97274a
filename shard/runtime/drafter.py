"""Guesses from a smaller model: speculative decoding's ``draft`` method (DRAFT_MODEL_ID).

The router asks for k guesses for a decoding sequence (shard.proto, Guesses.draft);
the draft model continues the sequence greedily for k tokens, and the engine
verifies them as it verifies the router's own guesses, so the output is the target
model's whatever the draft proposes: a draft only changes speed.

The draft model keeps its KV in a cache of its own that mirrors the target's: the
same number of blocks and tokens per block, addressed by the same block tables. So
the router's block accounting, prefix cache and rollback cover both, and a slot
the target reuses for another token is reused by the draft too.

The draft computes lazily. A sequence's ``drafted`` counts its leading positions
whose draft KV is in the cache; a step that asks for guesses first computes the
positions from there to the pending token (a prompt the draft has not seen yet,
or the tokens decoded while guessing was off), then proposes. Invariant, per KV
slot (``_valid``): the draft cache holds the KV of the token whose target KV is in
that slot, at the same position. A prefix-cache hit starts a sequence's
``drafted`` at the first cached slot where that does not hold. Rejected guesses'
slots lie past the sequence's computed tokens, as for the target, and are
overwritten before anything reads them.
"""

from __future__ import annotations

import logging

import numpy
import torch

from shard.numerics.attention import SequenceSpan
from shard.runtime.batch_state import Sequence
from shard.runtime.kv_cache import KVLayout, PagedKVCache, kv_layout_of
from shard.runtime.model_runner import ModelRunner

log = logging.getLogger(__name__)

#: Most positions one step computes to bring a sequence's draft KV up to date; a longer
#: backlog (a long prompt) is computed over several steps, which guess once it is done,
#: so that no step takes a whole prompt's time for the draft.
MAX_CATCH_UP = 256


class Drafter:
    def __init__(self, runner: ModelRunner, max_catch_up: int = MAX_CATCH_UP):
        self.runner = runner
        self.max_catch_up = max_catch_up
        self.cache: PagedKVCache | None = None
        #: Per KV slot: whether the draft cache holds the KV of the token whose target KV is there.
        self._valid = numpy.zeros(0, dtype=bool)

    @property
    def layout(self) -> KVLayout:
        return kv_layout_of(self.runner.model.config, self.runner.dtype)

    def allocate(self, num_blocks: int, block_size: int) -> None:
        """A cache of the target's shape (its block ids address both), then one step to warm up."""
        self.cache = PagedKVCache(self.layout, num_blocks, block_size, self.runner.device)
        self._valid = numpy.zeros(num_blocks * block_size, dtype=bool)
        with torch.inference_mode():
            self.runner.logits([0], [0], self.runner.step(self.cache, [SequenceSpan(1, 0, [0])]), [0], [])

    def admitted(self, seq: Sequence, existing: Sequence | None) -> None:
        """A sequence's draft progress when it (or its next prompt chunk) arrives: carried over,
        or, for a new one, the leading cached positions whose draft KV holds."""
        if existing is not None:
            seq.drafted = existing.drafted
            return
        positions = numpy.arange(seq.computed)
        valid = self._valid[self._slots(seq, positions)]
        seq.drafted = seq.computed if valid.all() else int(numpy.argmin(valid))

    @torch.inference_mode()
    def propose(self, asks: list[tuple[Sequence, int]]) -> None:
        """Sets each sequence's ``guesses``: up to k tokens after its pending one, the draft model's
        greedy continuation (none while its draft KV is still catching up)."""
        cache = self._require_cache()
        active: list[tuple[Sequence, int]] = []
        spans: list[SequenceSpan] = []
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        for seq, k in asks:
            seq.guesses = []
            end = len(seq.token_ids)  # through the pending token
            start = seq.drafted
            if end - start > self.max_catch_up:
                end = start + self.max_catch_up  # catching up only, no guess this step
            else:
                active.append((seq, k))
                rows.append(len(ids) + end - start - 1)
            spans.append(SequenceSpan(end - start, start, seq.blocks))
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            seq.draft_end = end
        while spans:
            logits, _ = self.runner.logits(ids, positions, self.runner.step(cache, spans), rows, [])
            guessed = logits.argmax(dim=-1).tolist() if rows else []
            for (seq, _), token in zip(active, guessed, strict=True):
                seq.guesses.append(int(token))
            active = [(seq, k) for seq, k in active if len(seq.guesses) < k]
            # The next round computes each unfinished sequence's newest guess and reads its logits.
            spans = [SequenceSpan(1, seq.draft_end, seq.blocks) for seq, _ in active]
            ids = [seq.guesses[-1] for seq, _ in active]
            positions = [seq.draft_end for seq, _ in active]
            rows = list(range(len(active)))
            for seq, _ in active:
                seq.draft_end += 1

    def settle(self, seq: Sequence, start: int) -> None:
        """After a step that advanced ``seq`` from ``start`` computed tokens: its draft progress
        (what the draft wrote, up to what the step kept) and the validity of the slots written."""
        low = start
        if seq.draft_end:
            low = min(seq.drafted, start)
            seq.drafted = min(seq.draft_end, seq.computed)
            seq.draft_end = 0
        if seq.computed > low:
            positions = numpy.arange(low, seq.computed)
            self._valid[self._slots(seq, positions)] = positions < seq.drafted

    def _slots(self, seq: Sequence, positions: numpy.ndarray) -> numpy.ndarray:
        size = self._require_cache().block_size
        blocks = numpy.asarray(seq.blocks, dtype=numpy.int64)[positions // size]
        return blocks * size + positions % size

    def _require_cache(self) -> PagedKVCache:
        if self.cache is None:
            raise RuntimeError("the draft cache is allocated in warmup")
        return self.cache
