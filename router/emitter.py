"""From a sampled token to the event its caller receives: text, token details, finish and usage."""

from __future__ import annotations

import math

from router.request import Request, StreamEvent, TokenInfo
from router.shard_client import ShardGeneration, ShardInputScores
from router.tokenization import Tokenizer


class Emitter:
    def __init__(self, tokenizer: Tokenizer, max_total_tokens: int):
        self.tokenizer = tokenizer
        self.max_total_tokens = max_total_tokens

    def event(self, r: Request, g: ShardGeneration) -> tuple[StreamEvent, str | None]:
        """The event for ``r``'s newest token ``g`` (already appended to ``r.generated``) and, when
        it is the last, why the request finished (the stream's reason: "stop", "length",
        "stop_sequence"; a tool-call answer's event says "tool_calls")."""
        text = r.stream.push(g.token_id)
        token = self._token_info(r, g)
        finish = r.stream.finish
        if finish is None and r.length >= self.max_total_tokens:
            finish = "length"
        if finish is None:
            event = StreamEvent(text, (token,), reasoning=r.stream.take_reasoning())
        else:
            event = self._final_event(r, text, token, finish)
            event.reasoning = r.stream.take_reasoning()
            event.reasoning_tokens = r.stream.reasoning_tokens
        if r.prompt_logprobs and len(r.generated) == 1:  # the first event carries the prompt's scores
            first = TokenInfo(r.prompt_ids[0], math.nan, self.tokenizer.is_special(r.prompt_ids[0]))
            first.text = self.tokenizer.token_text(r.prompt_ids[0])
            event.prompt = (first, *r.prompt_scores)
        return event, finish

    def prompt_scores(self, r: Request, scores: ShardInputScores) -> None:
        """Takes in a chunk's prompt-token scores: each position once, in order (a recomputed
        chunk's scores, the same bits, are not taken twice)."""
        text = self.tokenizer.token_text
        for k, logprob in enumerate(scores.logprobs):
            position = scores.first_position + k
            if position != len(r.prompt_scores) + 1 or position >= len(r.prompt_ids):
                continue
            token = r.prompt_ids[position]
            top = tuple((t, lp, text(t)) for t, lp in scores.top[k])
            r.prompt_scores.append(
                TokenInfo(token, logprob, self.tokenizer.is_special(token), text(token), top, scores.ranks[k])
            )

    def _final_event(self, r: Request, text: str, token: TokenInfo, finish: str) -> StreamEvent:
        counts = (len(r.prompt_ids), len(r.generated))
        made = r.stream.tool_calls()
        if made is not None:
            after, calls = made
            return StreamEvent(
                text + after, (token,), "tool_calls", *counts, tool_calls=tuple(calls), cached_tokens=r.cached_tokens
            )
        text += r.stream.unreleased()  # a call cut short (max_tokens): what there is goes out as text
        return StreamEvent(text, (token,), finish, *counts, cached_tokens=r.cached_tokens)

    def _token_info(self, r: Request, g: ShardGeneration) -> TokenInfo:
        special = self.tokenizer.is_special(g.token_id)
        if not r.want_logprobs:
            return TokenInfo(g.token_id, g.logprob, special)
        text = self.tokenizer.token_text
        top = tuple((t, lp, text(t)) for t, lp in g.top)
        return TokenInfo(g.token_id, g.logprob, special, text(g.token_id), top)
