"""Grammar texts the router sends: only what UTF-8 JSON can hold."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from router.grammar import json_schema_grammar, regex_grammar, tool_call_grammar, unicode_scalars_only

SURROGATE = b"\xed\xa0\x80"  # U+D800 encoded as UTF-8 would: not valid UTF-8


def _accepts(grammar: str, data: bytes) -> bool:
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo(["a"]), max_threads=1).compile_grammar(
        xgr.Grammar.from_ebnf(grammar)
    )
    return bool(xgr.GrammarMatcher(compiled)._handle.accept_string(data, False))


def test_negated_classes_lose_surrogates_and_literals_are_untouched():
    text = r'a ::= "[^x]" [^\]"] "\"[^" [abc]'
    assert unicode_scalars_only(text) == r'a ::= "[^x]" [^\uD800-\uDFFF\]"] "\"[^" [abc]'


@pytest.mark.parametrize(
    ("grammar", "prefix"),
    [
        (json_schema_grammar('{"type": "string"}'), b'"'),
        (json_schema_grammar('{"type": "string", "maxLength": 5}'), b'"'),
        (regex_grammar("a.b"), b"a"),
        (tool_call_grammar([("f", '{"type": "object"}')], allow_text=True, parallel=False), b""),
    ],
)
def test_no_grammar_admits_a_surrogate(grammar, prefix):
    assert not _accepts(grammar, prefix + SURROGATE)
    assert _accepts(grammar, prefix + "中".encode())


def test_bounded_strings_refuse_control_characters():
    """xgrammar's class for length-bounded strings admits raw control characters; JSON does not."""
    grammar = json_schema_grammar(json.dumps({"type": "string", "maxLength": 5}))
    assert not _accepts(grammar, b'"\x01')
    assert _accepts(grammar, b'"ab"')
