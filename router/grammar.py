"""Output constraints as xgrammar grammars: response formats (tool calls: router.tools).

Everything becomes one grammar text (xgrammar's EBNF) that the shards compile
and cache. Building it here validates it: a schema or regex the engine cannot
compile is a 400 naming the field, before the request is queued.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

import xgrammar as xgr

from router.errors import ValidationError

log = logging.getLogger(__name__)

#: UTF-16 surrogates: code points that xgrammar's negated classes admit, but that UTF-8
#: text cannot hold (their 3-byte encodings decode to three U+FFFD each).
_SURROGATES = r"\uD800-\uDFFF"


def unicode_scalars_only(ebnf: str) -> str:
    """Excludes surrogates from the negated character classes (``[^...]``) and the any-character
    class of an EBNF text.

    Without it a model can emit, inside a JSON string, bytes the grammar counts as one
    character and a client decodes as three replacement characters (breaking a
    maxLength, for one). String literals and escapes are copied untouched.
    """
    out: list[str] = []
    i, quoted, in_class = 0, False, False
    while i < len(ebnf):
        c = ebnf[i]
        if c == "\\" and (quoted or in_class):
            out.append(ebnf[i : i + 2])
            i += 2
            continue
        if quoted:
            quoted = c != '"'
        elif in_class:
            in_class = c != "]"
        elif c == '"':
            quoted = True
        elif c == "[":
            in_class = True
            if ebnf.startswith("[^", i):
                out.append("[^" + _SURROGATES)
                i += 2
                continue
        out.append(c)
        i += 1
    # A regex's "." becomes the class of every code point.
    return "".join(out).replace(_ANY_CODE_POINT, _ANY_SCALAR)


_BOUNDED_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n]"
_ANY_CODE_POINT = r"[\0-\U0010ffff]"
_ANY_SCALAR = r"[\0-\uD7FF\uE000-\U0010ffff]"


@lru_cache(maxsize=256)
def json_schema_grammar(schema: str, param: str = "response_format.json_schema.schema") -> str:
    try:
        text = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValidationError(f"invalid JSON schema: {_first_line(exc)}", param=param) from exc
    return json_strings_only(text)


def json_strings_only(ebnf: str) -> str:
    """An EBNF text whose JSON strings hold only what JSON text may: no raw control characters
    (xgrammar's class for length-bounded strings admits them; its unbounded class does not), no
    surrogates."""
    return unicode_scalars_only(ebnf.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))


@lru_cache(maxsize=1)
def json_object_grammar() -> str:
    return json_schema_grammar('{"type": "object"}')


@lru_cache(maxsize=256)
def regex_grammar(pattern: str) -> str:
    try:
        return unicode_scalars_only(str(xgr.Grammar.from_regex(pattern)))
    except (RuntimeError, ValueError) as exc:
        raise ValidationError(f"invalid regex: {_first_line(exc)}", param="response_format") from exc


#: xgrammar prefixes its messages with "[15:56:29] /project/cpp/json_schema_converter.cc:5082: ":
#: the time and its C++ source position mean nothing to a client.
_XGRAMMAR_PREFIX = re.compile(r"^\s*(\[[0-9:]+\]\s*)?(\S+\.(cc|cpp|h):\d+:\s*)?")


def _first_line(exc: Exception) -> str:
    """The first line of a grammar compiler's message, without its time stamp and source position."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    log.info("grammar rejected: %s", lines[0])
    return _XGRAMMAR_PREFIX.sub("", lines[0]) or type(exc).__name__
