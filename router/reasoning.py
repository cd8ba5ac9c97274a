"""Reasoning models' thinking, apart from their answer (vLLM's reasoning parsers).

A reasoning model writes its thinking between two tags before the answer
(``<think>…</think>`` for Qwen3, DeepSeek-R1 and SmolLM3). Some chat templates
open the thinking in the prompt (DeepSeek-R1's generation prompt ends with
``<think>``), so the output starts inside it and only the end tag is written;
others let the model open it, or put an empty block in the prompt when thinking
is switched off (Qwen3's and SmolLM3's ``enable_thinking=false``). So where the
output starts is read from the rendered prompt, per request: inside the thinking
when the prompt's last think tag is an open one.

``ReasoningWatch`` follows one stream's text: what lies inside the thinking is
released as reasoning, what follows its end as the answer (tool calls and
structured outputs apply to the answer only). A tag's first characters are held
back until the next token says whether they are the tag, as stop sequences are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import xgrammar as xgr

from router.grammar import unicode_scalars_only
from router.text_marks import partial_mark


#: REASONING_PARSER's named formats; each names the tags its models write.
@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    start: str = "<think>"
    end: str = "</think>"


REASONING_FORMATS = {name: ReasoningFormat(name) for name in ("deepseek_r1", "qwen3", "smollm3")}


def reasoning_format(setting: str, chat_template: str) -> ReasoningFormat | None:
    """REASONING_PARSER's format: a named one, none, or (auto) think tags when the chat template
    writes them."""
    if setting == "none":
        return None
    if setting != "auto":
        return REASONING_FORMATS[setting]
    tags = ReasoningFormat("auto")
    return tags if tags.start in chat_template or tags.end in chat_template else None


def starts_inside(fmt: ReasoningFormat, prompt: str) -> bool:
    """Whether the output begins inside the thinking: the prompt's last tag opens it."""
    return prompt.rfind(fmt.start) > prompt.rfind(fmt.end)


#: Whitespace a model may write between its thinking and a constrained answer.
_GAP = "root ::= [ \\t\\r\\n]*"


@lru_cache(maxsize=256)
def after_thinking(grammar: str, fmt: ReasoningFormat, inside: bool) -> str:
    """``grammar`` (an output constraint) for what follows the thinking: free text up to the end
    tag first (opened by the prompt when ``inside``, else optionally by the model), so that a
    structured output or a tool call constrains the answer only, never the thinking."""
    tag = {"type": "tag", "begin": "" if inside else fmt.start, "content": {"type": "any_text"}, "end": fmt.end}
    thinking = tag if inside else {"type": "optional", "content": tag}
    prefix = xgr.Grammar.from_structural_tag(json.dumps({"type": "structural_tag", "format": thinking}))
    combined = xgr.Grammar.concat(prefix, xgr.Grammar.from_ebnf(_GAP), xgr.Grammar.from_ebnf(grammar))
    return unicode_scalars_only(str(combined))


class ReasoningWatch:
    """Where one stream's thinking starts and ends, in its text."""

    def __init__(self, fmt: ReasoningFormat, inside: bool):
        self.format = fmt
        #: Where the thinking's text starts (after its start tag), once known.
        self.start: int | None = 0 if inside else None
        #: Where the answer starts (after the end tag, or 0 without thinking), once known.
        self.answer_start: int | None = None

    def follow(self, text: str, end: int, final: bool) -> None:
        """Reads ``text`` released up to ``end`` (the stop sequences' limit)."""
        if self.answer_start is not None:
            return
        if self.start is None:
            self._opening(text, final)
        if self.start is not None and self.answer_start is None:
            found = text.find(self.format.end, self.start, end if not final else len(text))
            if found >= 0:
                self.answer_start = found + len(self.format.end)

    def _opening(self, text: str, final: bool) -> None:
        """Before the output shows whether it opens a thinking block (leading whitespace aside)."""
        lead = len(text) - len(text.lstrip())
        head = text[lead:]
        if head.startswith(self.format.start):
            self.start = lead + len(self.format.start)
        elif final or not self.format.start.startswith(head):
            self.answer_start = 0  # no thinking: everything is the answer

    def reasoning_end(self, text: str, end: int, final: bool) -> int:
        """How far the thinking may be released: up to its end tag, and short of text that could
        still be that tag's beginning."""
        if self.start is None:
            return 0
        if self.answer_start is not None:
            return self.answer_start - len(self.format.end)
        if final:
            return len(text)
        return end - partial_mark(text, self.format.end, self.start, end)
