"""Grammar texts the router sends: only what UTF-8 JSON can hold."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from protos import router_pb2 as pb
from router.grammar import json_schema_grammar, regex_grammar, unicode_scalars_only
from router.tools import FORMATS, ToolCallFormat, tool_grammar

SURROGATE = b"\xed\xa0\x80"  # U+D800 encoded as UTF-8 would: not valid UTF-8
_CHAT = pb.Chat(tools=[pb.Tool(name="f", parameters='{"type": "object"}')], tool_choice=pb.TOOL_CHOICE_MODE_AUTO)


def _arguments_string_start(fmt: ToolCallFormat) -> bytes:
    call = fmt.write([("f", '{"k": "v"}')])
    return call[: call.index('"v"') + 1].encode()


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
        # Inside a call's arguments (free text around calls is the model's own, as without a grammar).
        *[(tool_grammar(fmt, _CHAT), _arguments_string_start(fmt)) for fmt in FORMATS.values()],
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
