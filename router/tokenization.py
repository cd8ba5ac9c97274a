"""The model's tokenizer and chat template, and incremental detokenization."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer as RustTokenizer
from tokenizers.decoders import DecodeStream
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from common.model_source import ModelSource
from router.errors import NoChatTemplate
from router.tools import HERMES, ToolCallFormat, with_tools_in_text

log = logging.getLogger(__name__)

#: Arguments of ``apply_chat_template`` itself, which a request's template variables may not set.
TEMPLATE_CALL_ARGUMENTS = frozenset(
    {"conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
     "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
     "return_assistant_tokens_mask", "tokenizer_kwargs", "messages"}
)  # fmt: skip

#: Prompt tokens kept as context when detokenizing, so that tokenizers which
#: mark word starts (SentencePiece's "▁") decode the first new token's space.
_DETOKENIZE_CONTEXT = 5


@dataclass
class Tokenizer:
    hf: PreTrainedTokenizerBase
    eos_token_ids: frozenset[int]
    special_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        # all_special_ids is recomputed on every access: look it up once.
        self.special_ids = frozenset(self.hf.all_special_ids)

    @classmethod
    def load(cls, source: ModelSource) -> Tokenizer:
        hf = AutoTokenizer.from_pretrained(source.path_or_id, **source.pretrained_kwargs())
        return cls(hf, _eos_ids(source, hf))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def chat_template_text(self) -> str:
        template = getattr(self.hf, "chat_template", "") or ""
        return template if isinstance(template, str) else json.dumps(template)

    @property
    def template_knows_tools(self) -> bool:
        return "tools" in self.chat_template_text

    def is_special_text(self, text: str) -> bool:
        """Whether ``text`` is one special token (which plain detokenization drops)."""
        # all_special_tokens is recomputed on every access; special_ids is looked up once.
        token_id = self.hf.convert_tokens_to_ids(text)  # an unknown text maps to the unknown token
        return token_id in self.special_ids and self.hf.convert_ids_to_tokens(token_id) == text

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        fmt: ToolCallFormat = HERMES,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt of a chat; tools go through the template when it renders them, else in the
        system prompt, with calls written in ``fmt``; ``template_kwargs``: the request's own
        template variables (e.g. enable_thinking)."""
        extra = template_kwargs or {}
        if not self.has_chat_template:
            raise NoChatTemplate(
                "this model has no chat template; send a raw prompt (/v1/completions or /generate) instead"
            )
        if tools and self.template_knows_tools:
            rendered = self.hf.apply_chat_template(
                messages,  # type: ignore[arg-type]
                tools=tools,  # type: ignore[arg-type]
                tokenize=False,
                add_generation_prompt=True,
                **extra,
            )
        else:
            rendered = self.hf.apply_chat_template(
                with_tools_in_text(messages, tools or [], fmt), tokenize=False, add_generation_prompt=True, **extra
            )
        return str(rendered)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def offsets(self, text: str, add_special_tokens: bool) -> list[tuple[int, int]]:
        """Character span of every token ``encode`` gives for ``text`` ((0, 0) for added special
        tokens); empty for a tokenizer without offsets (a slow one)."""
        if not self.hf.is_fast:
            return []
        encoding = self.hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return [(int(a), int(b)) for a, b in encoding["offset_mapping"]]

    def token_text(self, token_id: int) -> str:
        """One token decoded alone, special tokens included (as OpenAI's logprobs show them)."""
        return str(self.hf.decode([token_id], skip_special_tokens=False))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return str(self.hf.decode(ids, skip_special_tokens=skip_special_tokens))

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def detokenizer(self, prompt_ids: list[int], keep_special: bool = False) -> Detokenizer | StreamingDetokenizer:
        context = list(prompt_ids[-_DETOKENIZE_CONTEXT:])
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:
            return StreamingDetokenizer(backend, DecodeStream(ids=context, skip_special_tokens=not keep_special))
        return Detokenizer(self.hf, context, keep_special)


def _eos_ids(source: ModelSource, hf: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    if hf.eos_token_id is not None:
        ids.add(int(hf.eos_token_id))
    try:
        config = AutoConfig.from_pretrained(source.path_or_id, **source.pretrained_kwargs())
        eos = getattr(config, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    except (OSError, ValueError) as exc:  # a tokenizer-only folder has no model config
        log.warning("no model config for end-of-sequence ids: %s", exc)
    return frozenset(ids)


@dataclass
class StreamingDetokenizer:
    """Incremental decoding in the Rust tokenizer (fast tokenizers): one call per token."""

    backend: RustTokenizer
    stream: DecodeStream

    def push(self, token_id: int) -> str:
        return self.stream.step(self.backend, token_id) or ""


@dataclass
class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a window of ids twice (before and after the new token) and emits
    the difference, holding it back while it ends in an incomplete UTF-8
    sequence (U+FFFD), as TGI does.
    """

    hf: PreTrainedTokenizerBase
    ids: list[int]
    keep_special: bool = False
    prefix_offset: int = 0
    read_offset: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.read_offset < 0:
            self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        skip = not self.keep_special
        before = str(self.hf.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip))
        after = str(self.hf.decode(self.ids[self.prefix_offset :], skip_special_tokens=skip))
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""
