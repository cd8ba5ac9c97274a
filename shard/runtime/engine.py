"""The model runner: one forward over a packed batch, then sampling.

``Engine`` turns the router's Prefill/Decode/Filter/Clear calls into steps over
``BatchStore`` sequences. Each step packs every token it computes into one row,
runs the model once with our paged attention, computes logits only at the
positions that sample, and samples the whole batch at once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from shard.loading.lora import load_adapter
from shard.numerics.attention import SequenceSpan
from shard.numerics.lora import Adapter, StepAdapters, adapting, hook_projections
from shard.numerics.lora import forget as forget_adapter
from shard.numerics.sampling import LogitStats, SamplingParams, SequenceView, sample, score_tokens
from shard.runtime.batch_state import BatchStore, Sequence
from shard.runtime.drafter import Drafter
from shard.runtime.errors import CapacityError, InvalidRequest
from shard.runtime.kv_cache import PagedKVCache, kv_layout_of
from shard.runtime.memory import kv_budget_bytes
from shard.runtime.model_runner import ModelRunner
from shard.runtime.pooling import PooledRows, Pooling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewRequest:
    """A Prefill request, as the shard sees it (protobuf stays in the servicer)."""

    request_id: int
    input_ids: list[int]
    cache_len: int
    chunk_len: int
    blocks: list[int]
    params: SamplingParams
    sampled_before: int
    #: Score the input tokens this chunk predicts (prompt logprobs).
    score_inputs: bool = False
    #: Embed rather than generate (shard.runtime.pooling).
    pooling: Pooling = Pooling.NONE
    #: The LoRA adapter to apply, by name ("": the base model).
    adapter: str = ""


@dataclass(frozen=True)
class Generation:
    request_id: int
    token_id: int
    logprob: float
    #: (token id, logprob) of the most likely tokens, when the request asked for them.
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class InputScores:
    """The input tokens one chunk predicts, scored: input_ids[first_position:][:len(logprobs)]."""

    request_id: int
    first_position: int
    logprobs: list[float]
    #: 1-based rank of each token among the vocabulary.
    ranks: list[int]
    #: (token id, logprob) of the most likely tokens at each position, when asked for.
    top: list[list[tuple[int, float]]]


@dataclass
class StepResult:
    generations: list[Generation]
    batch_id: int
    request_ids: list[int]
    current_tokens: int
    forward_ns: int = 0
    decode_ns: int = 0
    input_scores: list[InputScores] = field(default_factory=list)
    #: (request id, pooled final hidden states) of embedding requests whose input completed.
    embeddings: list[tuple[int, list[float]]] = field(default_factory=list)


@dataclass
class StepOutputs:
    """What one forward produced, besides the KV it wrote."""

    generations: list[Generation] = field(default_factory=list)
    input_scores: list[InputScores] = field(default_factory=list)
    embeddings: list[tuple[int, list[float]]] = field(default_factory=list)
    forward_ns: int = 0
    decode_ns: int = 0


@dataclass
class StepRows:
    """Which rows of a packed step the forward must return, and for whom."""

    #: Rows whose logits sample a token: a sequence's last known position, then one per guess.
    sample: list[int] = field(default_factory=list)
    samplers: list[Sequence] = field(default_factory=list)
    #: (sequence, its first row, rows) of chunks whose next input tokens are scored.
    scored: list[tuple[Sequence, int, int]] = field(default_factory=list)
    #: (sequence, rows, whether its input completes) whose final hidden states an embedding keeps.
    pooled: list[tuple[Sequence, list[int], bool]] = field(default_factory=list)

    @property
    def score_rows(self) -> list[int]:
        return [first + k for _, first, rows in self.scored for k in range(rows)]

    @property
    def hidden_rows(self) -> list[int]:
        return [row for _, rows, _ in self.pooled for row in rows]


#: How long the engine must have been idle before the KV cache's memory is mapped ahead of use:
#: longer than the router's gap between steps, so a stream being served is never slowed.
PREFAULT_IDLE_S = 0.05


class Engine:
    def __init__(
        self,
        model: PreTrainedModel,
        device: torch.device,
        block_size: int,
        kv_fraction: float,
        world_size: int = 1,
        attention_backend: str = "auto",
        kv_prefault: bool = False,
        kv_prefault_ready_s: float = 0.0,
    ):
        self.model = model
        #: Tensor-parallel ranks: each holds 1/world_size of the KV heads.
        self.world_size = world_size
        self.device = device
        self.block_size = block_size
        self.kv_fraction = kv_fraction
        #: Fault the KV cache's memory in on a background thread after warmup (PagedKVCache.make_resident).
        self.kv_prefault = kv_prefault
        #: Of which up to this many seconds in warmup itself, before the shard answers ready.
        self.kv_prefault_ready_s = kv_prefault_ready_s
        self._stop_prefault: threading.Event | None = None
        self._stepping = False
        self._last_step_end = time.monotonic()
        self.runner = ModelRunner(model, device, attention_backend)
        self.dtype = self.runner.dtype
        text_config = model.config.get_text_config()
        self.max_positions = int(getattr(text_config, "max_position_embeddings", 0) or 1 << 20)
        self.vocab_size = self.runner.vocab_size
        #: The draft model's guesses (SPECULATIVE_METHOD=draft), when the shard has one.
        self.drafter: Drafter | None = None
        self.store = BatchStore()
        self.cache: PagedKVCache | None = None
        #: Warmup completed: steps can run (Health reports it).
        self.warm = False
        #: Set by the server when constrained decoding is available (it needs the tokenizer).
        self.grammar_compiler: Any = None
        #: LoRA adapters by name (LoadAdapter), and whether layers not in the fused form have hooks.
        self.adapters: dict[str, Adapter] = {}
        self._hooked = False

    def add_drafter(self, draft: PreTrainedModel, attention_backend: str = "auto") -> None:
        """Serves guesses from ``draft``, a smaller model with the same vocabulary (before warmup)."""
        runner = ModelRunner(draft, self.device, attention_backend)
        if runner.vocab_size != self.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary has {runner.vocab_size} tokens, the model's {self.vocab_size}"
            )
        if self.world_size > 1:
            raise ValueError("a draft model needs NUM_SHARD=1")
        self.drafter = Drafter(runner)

    def _grammars(self) -> Any:
        if self.grammar_compiler is None:
            raise InvalidRequest("this shard was started without constrained decoding")
        return self.grammar_compiler

    # --- LoRA adapters --------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> Adapter:
        """Loads (or replaces) adapter ``name`` from a PEFT folder; AdapterError if it does not fit."""
        if self.world_size > 1:
            raise InvalidRequest("LoRA adapters need NUM_SHARD=1")
        if name in self.adapters and self._users_of(name):
            raise CapacityError(f"adapter {name} is in use: replace it when its requests are done")
        adapter = load_adapter(name, path, self.model)
        if (replaced := self.adapters.get(name)) is not None:
            forget_adapter(replaced)
        if not self._hooked:
            layers = getattr(getattr(self.model, "model", None), "layers", [])
            for index, layer in enumerate(layers):
                if not hasattr(layer, "native_layer"):  # the fused form adds deltas itself
                    hook_projections(layer, index)
            self._hooked = True
        self.adapters[name] = adapter
        log.info("LoRA adapter %s: %d projections, rank %d, %.1f MiB", name, len(adapter.modules), adapter.rank,
                 adapter.nbytes / 2**20)  # fmt: skip
        return adapter

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise InvalidRequest(f"adapter {name} is not loaded", not_found=True)
        if users := self._users_of(name):
            raise CapacityError(f"adapter {name} is in use by requests {users[:5]}")
        forget_adapter(self.adapters.pop(name))

    def _users_of(self, name: str) -> list[int]:
        return [r for r, seq in self.store.sequences.items() if seq.adapter is not None and seq.adapter.name == name]

    # --- warmup -----------------------------------------------------------------

    def warmup(self, max_prefill_tokens: int, max_batch_size: int, max_total_tokens: int) -> int:
        """Allocates the KV cache and runs one step through it; returns the number of blocks.

        ``max_batch_size`` is part of the Warmup contract but sizes nothing here: every step
        runs the same code whatever its batch (no per-size compiled graphs to prepare)."""
        layout = kv_layout_of(self.model.config, self.dtype, self.world_size)
        budget = kv_budget_bytes(self.device, self.kv_fraction)
        per_token = layout.bytes_per_token() + (self.drafter.layout.bytes_per_token() if self.drafter else 0)
        per_block = per_token * self.block_size
        affordable = budget // per_block
        wanted = -(-max_total_tokens // self.block_size) if max_total_tokens else affordable
        if wanted > affordable:
            # As TGI does with paged attention: the memory budget bounds the cache,
            # the requested figure is a ceiling, not an obligation.
            log.warning(
                "MAX_BATCH_TOTAL_TOKENS=%d needs %.2f GiB of KV cache but the budget is %.2f GiB "
                "(%.0f%% of free memory): allocating %d tokens",
                max_total_tokens,
                wanted * per_block / 2**30,
                budget / 2**30,
                self.kv_fraction * 100,
                affordable * self.block_size,
            )
            wanted = affordable
        if wanted < 2:
            raise CapacityError(
                f"out of memory for the KV cache: a budget of {budget / 2**20:.1f} MiB "
                f"({self.kv_fraction:.0%} of free memory) holds fewer than 2 blocks; raise --kv-cache-fraction"
            )
        self.warm = False
        self.store.clear(None)
        if self._stop_prefault is not None:
            self._stop_prefault.set()
        self.cache = PagedKVCache(layout, int(wanted), self.block_size, self.device)
        if self.drafter is not None:
            self.drafter.allocate(int(wanted), self.block_size)
        self._warmup_step(min(max_prefill_tokens, self.cache.num_slots, self.max_positions))
        if self.kv_prefault and self.device.type == "cpu":
            self._map_before_ready(self.cache)
            self._stop_prefault = self.cache.make_resident_in_background(lambda: self.idle_for() >= PREFAULT_IDLE_S)
        self.warm = True
        return int(wanted)

    def _map_before_ready(self, cache: PagedKVCache) -> None:
        """The lowest blocks' memory mapped in warmup, within ``kv_prefault_ready_s``.

        Why in warmup as well as in the background: a load that starts as soon as the shard is
        ready never leaves the engine idle, so the background thread cannot get ahead of it,
        and the steps pay the first-touch faults (docs/performance.md, "KV cache memory"). The
        router hands out the lowest never-used blocks first, so these are the blocks the first
        requests get. Where memory maps at its normal
        speed (GiB/s) the whole cache is done well within the budget."""
        if self.kv_prefault_ready_s <= 0:
            return
        started = time.monotonic()
        done = cache.make_resident(threading.Event(), deadline=started + self.kv_prefault_ready_s)
        if done:
            log.info(
                "KV cache: %.2f GiB mapped in %.1f s before ready (blocks 0-%d of %d)",
                done / 2**30,
                time.monotonic() - started,
                cache.resident_blocks - 1,
                cache.num_blocks,
            )

    def _warmup_step(self, tokens: int) -> None:
        # On CUDA the worst-case prefill reveals an out-of-memory now rather than
        # under load; on CPU memory is not pre-reserved, so a short step suffices
        # to initialise kernels.
        if self.device.type != "cuda":
            tokens = min(tokens, 32)
        tokens = max(1, tokens)
        blocks = list(range(-(-tokens // self.block_size)))
        probe = Sequence(-1, [0] * tokens, blocks, 0, SamplingParams(temperature=1.0), 0)
        self._run([(probe, tokens)])

    # --- the four batch operations ----------------------------------------------

    def prefill(self, batch_id: int, requests: list[NewRequest]) -> StepResult:
        work = [(self._admit(batch_id, r), r.chunk_len) for r in requests]
        return self._result(batch_id, self._timed_run(work))

    def decode(
        self,
        batch_ids: list[int],
        extensions: dict[int, list[int]],
        chunks: list[NewRequest] | None = None,
        drop: list[int] | None = None,
        guesses: dict[int, list[int]] | None = None,
        drafts: dict[int, int] | None = None,
    ) -> StepResult:
        """Drops the ``drop`` requests, advances every other decoding sequence by one token (or,
        with ``guesses`` for it, or ``drafts`` guesses of the draft model, by the guesses
        verification keeps plus one) and computes ``chunks`` (prompt chunks joining the first
        batch) in the same forward pass."""
        batch_id = self.store.merge(batch_ids)
        members = self.store.drop(batch_id, drop or [])
        for seq in members:
            seq.blocks.extend(extensions.get(seq.request_id, []))
        self._check_blocks([b for seq in members for b in extensions.get(seq.request_id, [])])
        prompt_work = [(self._admit(batch_id, r), r.chunk_len) for r in chunks or []]
        chunked = {seq.request_id for seq, _ in prompt_work}
        # Sequences still mid-prompt advance only through the chunks the router sends.
        decoding = [seq for seq in members if seq.decoding and seq.request_id not in chunked]
        self._draft(decoding, guesses or {}, drafts or {})
        for seq in decoding:
            seq.guesses = self._checked_guesses(seq, (guesses or {}).get(seq.request_id, seq.guesses))
        work = [(seq, 1 + len(seq.guesses)) for seq in decoding]
        return self._result(batch_id, self._timed_run(work + prompt_work))

    def _draft(self, decoding: list[Sequence], guesses: dict[int, list[int]], drafts: dict[int, int]) -> None:
        """The draft model's guesses for the sequences asked (``Sequence.guesses``)."""
        for seq in decoding:
            seq.guesses = []
        if not drafts:
            return
        if self.drafter is None:
            raise InvalidRequest("this shard has no draft model (DRAFT_MODEL_ID): send guessed tokens instead")
        asks = []
        for seq in decoding:
            wanted = drafts.get(seq.request_id, 0)
            if wanted and seq.request_id in guesses:
                raise InvalidRequest(f"request {seq.request_id}: guessed tokens and a draft are exclusive")
            # Never past the model's positions or the blocks the router grew for the guesses.
            room = min(self.max_positions, len(seq.blocks) * self.block_size) - len(seq.token_ids)
            if (k := min(wanted, room)) > 0:
                asks.append((seq, k))
        self.drafter.propose(asks)

    def _checked_guesses(self, seq: Sequence, guesses: list[int]) -> list[int]:
        """The guesses to verify: valid ids within the model's positions and, for a constrained
        request, the longest run its grammar allows (each row then gets the matcher state after
        the guesses before it, ``Sequence.row_matchers``)."""
        seq.row_matchers = []
        if not guesses:
            return []
        if any(not 0 <= t < self.vocab_size for t in guesses):
            raise InvalidRequest(f"request {seq.request_id}: guessed token ids must be in [0, {self.vocab_size})")
        if len(seq.token_ids) + len(guesses) > self.max_positions:
            raise CapacityError(
                f"request {seq.request_id}: its guesses pass the model's {self.max_positions} positions"
            )
        if seq.matcher is None:
            return list(guesses)
        # Row k's mask is the grammar's after the first k guesses: a fork advanced over them.
        # A guess the grammar refuses ends the run (no draw there could equal it).
        rows, state = [seq.matcher], seq.matcher.fork()
        for k, token in enumerate(guesses):
            if state.is_terminated() or not state.accept_token(token):
                guesses = guesses[:k]
                break
            rows.append(state.fork())
        seq.row_matchers = rows
        return list(guesses)

    def filter(self, batch_id: int, keep: list[int]) -> StepResult:
        self.store.filter(batch_id, keep)
        return self._result(batch_id, StepOutputs())

    def clear(self, batch_id: int | None) -> None:
        self.store.clear(batch_id)

    # --- internals ----------------------------------------------------------------

    def _admit(self, batch_id: int, request: NewRequest) -> Sequence:
        cache = self._require_cache()
        end = request.cache_len + request.chunk_len
        if request.chunk_len < 1 or end > len(request.input_ids):
            raise InvalidRequest(
                f"request {request.request_id}: cache_len {request.cache_len} + chunk_len "
                f"{request.chunk_len} must be within its {len(request.input_ids)} input ids"
            )
        if len(request.input_ids) > self.max_positions:
            raise CapacityError(
                f"request {request.request_id}: {len(request.input_ids)} tokens exceed the model's "
                f"{self.max_positions} positions"
            )
        if any(not 0 <= t < self.vocab_size for t in request.input_ids):
            raise InvalidRequest(f"request {request.request_id}: token ids must be in [0, {self.vocab_size})")
        self._check_blocks(request.blocks)
        if len(request.blocks) * cache.block_size < end:
            raise InvalidRequest(f"request {request.request_id}: {len(request.blocks)} blocks cannot hold {end} tokens")
        existing = self.store.sequences.get(request.request_id)
        if existing is not None and existing.computed != request.cache_len:
            raise InvalidRequest(
                f"request {request.request_id}: next chunk starts at {request.cache_len} "
                f"but {existing.computed} tokens are computed"
            )
        seq = Sequence(
            request.request_id,
            list(request.input_ids),
            list(request.blocks),
            request.cache_len,
            request.params,
            request.sampled_before,
            score_inputs=request.score_inputs,
        )
        if request.pooling is not Pooling.NONE:
            if existing is None and request.cache_len and request.pooling is not Pooling.LAST:
                raise InvalidRequest(
                    f"request {request.request_id}: {request.pooling.name} pooling reads every position "
                    "from the first: it cannot start from cached tokens"
                )
            seq.pooled = existing.pooled if existing is not None and existing.pooled else PooledRows(request.pooling)
        if request.adapter:
            if request.adapter not in self.adapters:
                raise InvalidRequest(f"request {request.request_id}: adapter {request.adapter} is not loaded",
                                     not_found=True)  # fmt: skip
            seq.adapter = self.adapters[request.adapter]
        if self.drafter is not None:
            self.drafter.admitted(seq, existing)
        if existing is not None:
            seq.matcher = existing.matcher
        elif request.params.grammar:
            replay = (
                request.input_ids[len(request.input_ids) - request.sampled_before :] if request.sampled_before else []
            )
            seq.matcher = self._grammars().matcher(request.params.grammar, replay)
        self.store.add(batch_id, seq)
        return seq

    def _check_blocks(self, blocks: list[int]) -> None:
        cache = self._require_cache()
        bad = [b for b in blocks if b >= cache.num_blocks]
        if bad:
            raise InvalidRequest(f"block ids {bad[:5]} out of range (the cache has {cache.num_blocks} blocks)")

    def _require_cache(self) -> PagedKVCache:
        if self.cache is None:
            raise CapacityError("the shard is not warmed up: call Warmup first")
        return self.cache

    def _timed_run(self, work: list[tuple[Sequence, int]]) -> StepOutputs:
        if not work:
            return StepOutputs()
        self._stepping = True
        try:
            return self._run(work)
        finally:
            self._stepping = False
            self._last_step_end = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since the last step ended; 0 while one runs."""
        return 0.0 if self._stepping else time.monotonic() - self._last_step_end

    @torch.inference_mode()
    def _run(self, work: list[tuple[Sequence, int]]) -> StepOutputs:
        """Computes ``n`` tokens of each (sequence, n); samples where a sequence's known tokens run
        out (or pools its embedding), and scores the input tokens of chunks that asked for it."""
        cache = self._require_cache()
        started = time.perf_counter_ns()
        spans: list[SequenceSpan] = []
        ids: list[int] = []
        positions: list[int] = []
        rows = StepRows()
        for seq, n in work:
            start, end = seq.computed, seq.computed + n
            if len(seq.blocks) * cache.block_size < end:
                raise CapacityError(f"request {seq.request_id}: block table too short for {end} tokens")
            spans.append(SequenceSpan(n, start, seq.blocks))
            self._rows_of(seq, start, end, len(ids), rows)
            ids.extend(seq.inputs(start, end))
            positions.extend(range(start, end))
        score_rows = rows.score_rows
        step = self.runner.step(cache, spans)
        with adapting(self._step_adapters(work)):
            logits, stats, hidden = self.runner.forward(
                ids, positions, step, rows.sample + score_rows, rows.hidden_rows
            )
        forward_done = time.perf_counter_ns()
        picked = len(rows.sample)
        out = StepOutputs(
            generations=self._sample(rows.samplers, logits[:picked], stats.rows(0, picked)),
            input_scores=self._score(rows.scored, logits[picked:], stats.rows(picked, len(score_rows))),
            embeddings=self._pool(rows.pooled, hidden),
        )
        for seq, n in work:
            # A rejected guess's position holds KV beyond the sequence's computed tokens: it is
            # overwritten as the sequence grows (``_verify``).
            start = seq.computed
            seq.computed += n - len(seq.guesses) + seq.accepted
            if self.drafter is not None:
                self.drafter.settle(seq, start)
            seq.score_inputs, seq.guesses, seq.accepted, seq.row_matchers = False, [], 0, []  # asked per step
        out.forward_ns, out.decode_ns = forward_done - started, time.perf_counter_ns() - forward_done
        return out

    def _step_adapters(self, work: list[tuple[Sequence, int]]) -> StepAdapters | None:
        """The packed step's rows of each adapter its sequences use (None when none does)."""
        if all(seq.adapter is None for seq, _ in work):
            return None
        slots: dict[Adapter, int] = {}
        slot_of_row: list[int] = []
        for seq, n in work:
            slot = -1 if seq.adapter is None else slots.setdefault(seq.adapter, len(slots))
            slot_of_row.extend([slot] * n)
        return StepAdapters(list(slots), torch.tensor(slot_of_row, dtype=torch.int32))

    @staticmethod
    def _rows_of(seq: Sequence, start: int, end: int, first_row: int, rows: StepRows) -> None:
        """Adds to ``rows`` what ``seq``'s chunk of positions [start, end), at ``first_row``, needs."""
        total = len(seq.token_ids)
        if seq.score_inputs and (count := min(end, total - 1) - start) > 0:
            rows.scored.append((seq, first_row, count))
        if seq.pooled is not None:
            kept = [first_row + k for k in seq.pooled.wanted(start, end, total)]
            rows.pooled.append((seq, kept, end == total))
        elif end >= total:  # the pending token, then each guess (verification samples every one)
            rows.sample.extend(first_row + total - 1 - start + k for k in range(1 + len(seq.guesses)))
            rows.samplers.append(seq)

    @staticmethod
    def _pool(
        pooled: list[tuple[Sequence, list[int], bool]], hidden: torch.Tensor | None
    ) -> list[tuple[int, list[float]]]:
        """Keeps each embedding request's rows; answers those whose input this step completes."""
        done, at = [], 0
        for seq, kept, completes in pooled:
            assert seq.pooled is not None
            if kept:
                assert hidden is not None
                seq.pooled.rows.append(hidden[at : at + len(kept)].clone())
                at += len(kept)
            if completes:
                done.append((seq.request_id, seq.pooled.vector()))
        return done

    def _score(
        self, scored: list[tuple[Sequence, int, int]], logits: torch.Tensor, stats: LogitStats
    ) -> list[InputScores]:
        """Each scored chunk's next input tokens, under the raw distribution of the rows before them."""
        if not scored:
            return []
        targets = [t for seq, _, rows in scored for t in seq.token_ids[seq.computed + 1 : seq.computed + 1 + rows]]
        top_n = [seq.params.top_n_tokens for seq, _, rows in scored for _ in range(rows)]
        logprobs, ranks, top = score_tokens(logits, stats, targets, top_n)
        result, at = [], 0
        for seq, _, rows in scored:
            span = slice(at, at + rows)
            result.append(InputScores(seq.request_id, seq.computed + 1, logprobs[span], ranks[span], top[span]))
            at += rows
        return result

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, stats: LogitStats) -> list[Generation]:
        """Samples each sequence's next token, or verifies its guesses (``_verify``)."""
        if not seqs:
            return []
        rows = [
            # Row k of a sequence: what decoding would see after its first k guesses (its random
            # counter k further, its history k guesses longer): sampling without guesses there.
            SequenceView(
                s.params,
                s.sampled + k,
                s.token_ids + s.guesses[:k] if k else s.token_ids,  # no copy per step without guesses
                s.sampled + k,
                s.row_matchers[k] if s.row_matchers else s.matcher,
            )
            for s in seqs
            for k in range(1 + len(s.guesses))
        ]
        out = sample(logits, rows, stats)
        result: list[Generation] = []
        at = 0
        for seq in seqs:
            drawn = range(at, at + 1 + len(seq.guesses))
            at = drawn.stop
            for i in self._verify(seq, [out.tokens[i] for i in drawn]):
                row = drawn[i]
                token = out.tokens[row]
                seq.token_ids.append(token)
                seq.sampled += 1
                if seq.matcher is not None and not seq.matcher.is_terminated():
                    seq.matcher.accept_token(token)
                result.append(Generation(seq.request_id, token, out.logprobs[row], out.top[row]))
            seq.decoding = True
        return result

    @staticmethod
    def _verify(seq: Sequence, drawn: list[int]) -> range:
        """Which draws a sequence keeps: "sample, then compare". Draw k is what decoding would
        have drawn after the first k guesses; a guess is accepted while it equals the draw before
        it, and the first draw that differs (or the one after the last guess) is kept too. So the
        kept tokens are exactly decoding's, and ``seq.accepted`` counts the guesses kept."""
        kept = 1
        while kept <= len(seq.guesses) and drawn[kept - 1] == seq.guesses[kept - 1]:
            kept += 1
        seq.accepted = kept - 1
        return range(kept)

    def _result(self, batch_id: int, out: StepOutputs) -> StepResult:
        members = self.store.batches.get(batch_id, [])
        tokens = sum(self.store.sequences[r].computed for r in members)
        return StepResult(
            out.generations, batch_id, list(members), tokens, out.forward_ns, out.decode_ns, out.input_scores,
            out.embeddings,
        )  # fmt: skip
