"""A model-free stand-in for ``shard.runtime.engine.Engine`` that checks what the router tells it.

It keeps, per KV slot, which (position, token) was written there, and before
every step verifies that the context a request claims to have cached
(prefix-cache hits, earlier chunks, earlier decode steps) is really in its
blocks. The next token is a pure function of the sequence so far and the
request's seed, so a preempted and recomputed request must produce exactly the
tokens of an uninterrupted run. Used by the router tests and by the router
benchmark, where it makes the shard cost nothing.
"""

from __future__ import annotations

import time

import torch

from shard.runtime.batch_state import BatchStore, Sequence
from shard.runtime.engine import Generation, NewRequest, StepResult
from shard.runtime.errors import CapacityError, InvalidRequest

#: Tokens the fake emits: plain word pieces of SmolLM2's vocabulary, never special tokens.
FIRST_TOKEN, TOKEN_RANGE = 1000, 5000


def next_token(tokens: list[int], seed: int) -> int:
    return FIRST_TOKEN + (hash((tuple(tokens[-4:]), len(tokens), seed)) % TOKEN_RANGE)


class FakeEngine:
    def __init__(
        self, num_blocks: int, block_size: int = 4, max_positions: int = 4096, verify: bool = True, step_s: float = 0.0
    ):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_positions = max_positions
        self.vocab_size = 49152
        self.verify = verify
        #: Seconds each step takes (reported as its forward time), to look like a model to the router.
        self.step_s = step_s
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        self.store = BatchStore()
        self.kv: dict[int, tuple[int, int]] = {}
        #: (kind, tokens computed, sequences): the prompt work and the decode work of each call.
        self.steps: list[tuple[str, int, int]] = []
        #: The step calls received, in order ("prefill" or "decode"): one per router step.
        self.calls: list[str] = []
        #: Makes the next step raise, as a crashing model would.
        self.fail_next_step = False
        self.warm = False

    def warmup(self, max_prefill_tokens: int, max_batch_size: int, max_total_tokens: int) -> int:
        self.store.clear(None)
        self.warm = True
        return self.num_blocks

    def prefill(self, batch_id: int, requests: list[NewRequest]) -> StepResult:
        self.calls.append("prefill")
        work = self._admit(batch_id, requests)
        return self._result(batch_id, self._run(work))

    def decode(
        self,
        batch_ids: list[int],
        extensions: dict[int, list[int]],
        chunks: list[NewRequest] | None = None,
        drop: list[int] | None = None,
        guesses: dict[int, list[int]] | None = None,
        drafts: dict[int, int] | None = None,
    ) -> StepResult:
        """``guesses`` and ``drafts`` are not verified here: each request gets one token, as if every
        guess failed."""
        self.calls.append("decode")
        batch_id = self.store.merge(batch_ids)
        members = self.store.drop(batch_id, drop or [])
        for seq in members:
            seq.blocks.extend(extensions.get(seq.request_id, []))
        prompt_work = self._admit(batch_id, chunks or [])
        chunked = {seq.request_id for seq, _ in prompt_work}
        work = [(seq, 1) for seq in members if seq.decoding and seq.request_id not in chunked]
        self.steps.append(("decode", len(work), len(work)))
        return self._result(batch_id, self._run(work + prompt_work))

    def _admit(self, batch_id: int, requests: list[NewRequest]) -> list[tuple[Sequence, int]]:
        work = []
        for r in requests:
            if r.cache_len + r.chunk_len > len(r.input_ids) or r.chunk_len < 1:
                raise InvalidRequest("bad chunk")
            seq = Sequence(r.request_id, list(r.input_ids), list(r.blocks), r.cache_len, r.params, r.sampled_before)
            self.store.add(batch_id, seq)
            work.append((seq, r.chunk_len))
        if work:
            self.steps.append(("prefill", sum(n for _, n in work), len(work)))
        return work

    def filter(self, batch_id: int, keep: list[int]) -> StepResult:
        self.store.filter(batch_id, keep)
        return self._result(batch_id, [])

    def clear(self, batch_id: int | None) -> None:
        self.store.clear(batch_id)

    def _slot(self, seq: Sequence, position: int) -> int:
        index = position // self.block_size
        if index >= len(seq.blocks):
            raise CapacityError(f"request {seq.request_id}: no block for position {position}")
        block = seq.blocks[index]
        if not 0 <= block < self.num_blocks:
            raise InvalidRequest(f"block {block} out of range")
        return block * self.block_size + position % self.block_size

    def _run(self, work: list[tuple[Sequence, int]]) -> list[Generation]:
        if not self.warm:
            raise CapacityError("the shard is not warmed up: call Warmup first")
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected fault")
        if self.step_s:
            time.sleep(self.step_s)  # on the model thread, as a forward would
        generations = []
        for seq, n in work:
            if self.verify:
                for p in range(seq.computed):
                    if self.kv.get(self._slot(seq, p)) != (p, seq.token_ids[p]):
                        raise InvalidRequest(f"request {seq.request_id}: KV of position {p} is not in its blocks")
            for p in range(seq.computed, seq.computed + n):
                self.kv[self._slot(seq, p)] = (p, seq.token_ids[p])
            seq.computed += n
            if seq.computed == len(seq.token_ids):
                token = next_token(seq.token_ids, seq.params.seed)
                seq.token_ids.append(token)
                seq.sampled += 1
                seq.decoding = True
                generations.append(Generation(seq.request_id, token, -1.0))
        return generations

    def _result(self, batch_id: int, generations: list[Generation]) -> StepResult:
        members = self.store.batches.get(batch_id, [])
        tokens = sum(self.store.sequences[r].computed for r in members)
        return StepResult(generations, batch_id, list(members), tokens, forward_ns=int(self.step_s * 1e9))
