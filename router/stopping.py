"""When a request is finished, and which text it may emit so far."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.reasoning import ReasoningWatch
from router.text_marks import partial_mark
from router.tokenization import Detokenizer, StreamingDetokenizer
from router.tools import Call, CallWatch


@dataclass
class StopCondition:
    eos_token_ids: frozenset[int]
    max_new_tokens: int
    stop_sequences: tuple[str, ...]
    ignore_eos: bool


@dataclass
class TextStream:
    """Detokenized output with stop sequences applied.

    Text that could still turn out to be the start of a stop sequence is held
    back, so a stop string is never emitted, even when it straddles tokens.
    """

    detokenizer: Detokenizer | StreamingDetokenizer
    condition: StopCondition
    text: str = ""
    emitted: int = 0
    generated: int = 0
    finish: str | None = field(default=None)
    #: Set when the output may hold tool calls: they are held back, never streamed as text.
    calls: CallWatch | None = None
    #: Set for a reasoning model: its thinking is released apart (``take_reasoning``), not as text.
    reasoning: ReasoningWatch | None = None
    #: How far ``text`` was released as thinking.
    reasoning_emitted: int = 0
    #: Thinking released and not yet taken.
    reasoning_pending: str = ""
    #: Tokens generated before the answer started (a reasoning model's thinking, its end tag included).
    reasoning_tokens: int = 0

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text it releases. Sets ``finish`` when done."""
        self.generated += 1
        if self.reasoning is not None and self.reasoning.answer_start is None:
            self.reasoning_tokens += 1
        is_eos = token_id in self.condition.eos_token_ids and not self.condition.ignore_eos
        if not is_eos:
            self.text += self.detokenizer.push(token_id)
        stop_at = self._find_stop()
        if stop_at is not None:
            self.text, self.finish = self.text[:stop_at], "stop_sequence"
        elif is_eos:
            self.finish = "stop"
        elif self.generated >= self.condition.max_new_tokens:
            self.finish = "length"
        end = len(self.text) if self.finish else len(self.text) - self._held_back()
        if self.reasoning is not None and not self._past_thinking(end):
            return ""
        if self.calls is not None:
            end = self.calls.releasable(self.text, self.emitted, end, final=self.finish is not None)
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return delta

    def _past_thinking(self, end: int) -> bool:
        """Releases the thinking up to ``end``; whether the answer has started (the text from
        ``emitted`` on is then the answer's)."""
        watch, final = self.reasoning, self.finish is not None
        assert watch is not None
        watch.follow(self.text, end, final)
        upto = watch.reasoning_end(self.text, end, final)
        since = max(self.reasoning_emitted, watch.start or 0)
        if upto > since:
            self.reasoning_pending += self.text[since:upto]
            self.reasoning_emitted = upto
        if watch.answer_start is None:
            if final:  # cut short inside the thinking: there is no answer
                self.emitted = len(self.text)
            return False
        self.emitted = max(self.emitted, watch.answer_start)
        return True

    def take_reasoning(self) -> str:
        """The thinking released since the last call."""
        taken, self.reasoning_pending = self.reasoning_pending, ""
        return taken

    def tool_calls(self) -> tuple[str, list[Call]] | None:
        """Once finished: (the text after the calls, the calls) when the output made complete calls."""
        return self.calls.split(self.text) if self.calls is not None else None

    def unreleased(self) -> str:
        """Once finished: the text held back as a call that was cut short (it goes out as text)."""
        rest, self.emitted = self.text[self.emitted :], len(self.text)
        return rest

    def _find_stop(self) -> int | None:
        # Only the unreleased tail can hold a new match: released text held none.
        window_start = max(0, self.emitted - max((len(s) for s in self.condition.stop_sequences), default=0))
        hits = [i for s in self.condition.stop_sequences if (i := self.text.find(s, window_start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop sequence."""
        return max((partial_mark(self.text, stop) for stop in self.condition.stop_sequences), default=0)
