"""A request as the router tracks it from arrival to its last event."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from opentelemetry.context import Context
from opentelemetry.trace import Span

from common.sampling_params import SamplingParams
from router.blocks import NEW_CHAIN, Chain
from router.stopping import TextStream


# slots, not frozen: one of each is made per generated token, and frozen __init__ is slower.
@dataclass(slots=True)
class TokenInfo:
    id: int
    logprob: float
    special: bool
    #: The token decoded alone; filled only for requests that asked for logprobs.
    text: str = ""
    #: (id, logprob, text) of the most likely alternatives.
    top: tuple[tuple[int, float, str], ...] = ()
    #: For prompt tokens: 1-based rank among the vocabulary; 0 otherwise.
    rank: int = 0


@dataclass(slots=True)
class StreamEvent:
    """What a caller receives: text and tokens, and on the last event the finish details."""

    text: str
    tokens: tuple[TokenInfo, ...]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Set when the request failed; no further events follow.
    error: Exception | None = None
    #: (name, arguments JSON) of the calls, on the last event of a tool-call answer.
    tool_calls: tuple[tuple[str, str], ...] = ()
    #: Prompt tokens served from the prefix cache, on the last event.
    cached_tokens: int = 0
    #: Thinking this event adds (a reasoning model's; never part of ``text``).
    reasoning: str = ""
    #: With prompt logprobs, on the first event: every prompt token (the first one's logprob NaN).
    prompt: tuple[TokenInfo, ...] = ()
    #: An embedding request's pooled vector, on its only event.
    embedding: list[float] | None = None
    #: Of completion_tokens, those of a reasoning model's thinking, on the last event.
    reasoning_tokens: int = 0


class Phase(enum.Enum):
    #: In the queue; holds no blocks.
    WAITING = "waiting"
    #: In the shard batch, its prompt (or recomputed sequence) partly computed.
    PREFILLING = "prefilling"
    #: In the shard batch with a sampled token awaiting its KV: Decode advances it.
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    stream: TextStream
    events: asyncio.Queue[StreamEvent] = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    #: Leading tokens of ``token_ids`` whose KV the shards hold.
    computed: int = 0
    phase: Phase = Phase.WAITING
    cancelled: bool = False
    #: Prefix-cache registration progress of ``blocks``.
    chain: Chain = NEW_CHAIN
    #: Off for requests that need every prompt position computed (prompt logprobs).
    use_prefix_cache: bool = True
    #: Score every prompt token (prompt logprobs); ``prompt_scores`` holds those of positions 1.. so far.
    prompt_logprobs: bool = False
    prompt_scores: list[TokenInfo] = field(default_factory=list)
    #: Whether events carry each token's text and alternatives (OpenAI logprobs).
    want_logprobs: bool = False
    #: Lower is served sooner under SCHEDULING_POLICY=priority (router.planner).
    priority: int = 0
    #: The LoRA adapter it generates with ("": the base model; router.adapters).
    adapter: str = ""
    #: Embed rather than generate: shard.proto's Pooling (0: generate).
    pooling: int = 0
    #: Speculation (router.speculation): guesses per step now (0: the most), whether its last
    #: guesses paid, and the totals.
    speculation_width: int = 0
    speculation_hot: bool = False
    spec_proposed: int = 0
    spec_accepted: int = 0
    arrived_at: float = field(default_factory=time.monotonic)
    #: The caller's trace context (the public RPC's span): batch steps it joins are traced under it.
    trace_context: Context | None = None
    #: Open while the request waits in the queue.
    queue_span: Span | None = None
    last_token_at: float | None = None
    #: When the request first joined the batch (TGI's inference duration starts there).
    admitted_at: float | None = None
    #: Prompt tokens the prefix cache served when the prompt was first admitted.
    cached_tokens: int = 0
    #: The replica serving it (router.replicas), for traces.
    replica: str = ""
    #: Prompt tokens its replica was expected to compute (not cached) when it was placed.
    uncached_at_placement: int | None = None

    @property
    def token_ids(self) -> list[int]:
        """Every token of the sequence: what the shards must hold KV for (but the last)."""
        return self.prompt_ids + self.generated

    @property
    def length(self) -> int:
        """len(token_ids), without building the list (this runs for every token)."""
        return len(self.prompt_ids) + len(self.generated)

    @property
    def max_new_tokens(self) -> int:
        return self.stream.condition.max_new_tokens
