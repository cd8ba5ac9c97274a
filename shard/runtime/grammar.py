"""Constrained decoding with xgrammar: a token mask per constrained sequence, applied before sampling.

The router sends each constraint as grammar text (EBNF, which xgrammar also
produces from JSON schemas and regexes). Grammars are compiled once per text
and cached; each constrained sequence gets its own matcher. Masks for the
whole step are filled into one bitmask tensor and applied in one call, and a
step without constrained sequences does no grammar work at all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import cached_property

import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from common.model_source import ModelSource, tokenizer_source
from shard.runtime.errors import InvalidRequest

_CACHE_ENTRIES = 256


class GrammarCompiler:
    def __init__(self, source: ModelSource, vocab_size: int):
        self.source = source
        self.vocab_size = vocab_size
        self._compiled: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    @cached_property
    def _compiler(self) -> xgr.GrammarCompiler:
        # The tokenizer is loaded only once a constrained request arrives.
        source = tokenizer_source(self.source)
        tokenizer = AutoTokenizer.from_pretrained(source.path_or_id, **source.pretrained_kwargs())
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
        return xgr.GrammarCompiler(info, max_threads=2)

    def compile(self, ebnf: str) -> xgr.CompiledGrammar:
        with self._lock:
            if ebnf in self._compiled:
                self._compiled.move_to_end(ebnf)
                return self._compiled[ebnf]
        try:
            compiled = self._compiler.compile_grammar(ebnf)
        except RuntimeError as exc:
            raise InvalidRequest(f"the grammar does not compile: {exc}") from exc
        with self._lock:
            self._compiled[ebnf] = compiled
            while len(self._compiled) > _CACHE_ENTRIES:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, ebnf: str, replay: list[int]) -> xgr.GrammarMatcher:
        """A matcher at the start of the grammar, advanced over ``replay`` (tokens generated before a preemption)."""
        matcher = xgr.GrammarMatcher(self.compile(ebnf))
        for token in replay:
            if not matcher.accept_token(token):
                raise InvalidRequest("the tokens to resume from do not match the request's grammar")
        return matcher


_BATCH_MATCHER: xgr.BatchGrammarMatcher | None = None


def apply_masks(scores: torch.Tensor, matchers: list[xgr.GrammarMatcher | None]) -> None:
    """Sets to -inf, in place, every token a row's grammar forbids next. scores: [B, vocab].

    The masks of all constrained rows are filled in one call (xgrammar's batch
    matcher, on its own threads) and applied in one call.
    """
    global _BATCH_MATCHER
    rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
    for i, m in enumerate(matchers):
        if m is not None and m.is_terminated():
            # The grammar is complete (and its stop token was taken, e.g. under ignore_eos):
            # only stop tokens may follow, so the text stays valid.
            stop = m.stop_token_ids
            keep = scores[i, stop].clone()
            scores[i].fill_(float("-inf"))
            scores[i, stop] = keep
    if not rows:
        return
    if _BATCH_MATCHER is None:
        _BATCH_MATCHER = xgr.BatchGrammarMatcher(max_threads=2)
    bitmask = xgr.allocate_token_bitmask(len(matchers), scores.shape[1])
    _BATCH_MATCHER.batch_fill_next_token_bitmask([matchers[i] for i in rows], bitmask, indices=rows)  # type: ignore[misc]
    xgr.apply_token_bitmask_inplace(scores, bitmask.to(scores.device), indices=rows)
