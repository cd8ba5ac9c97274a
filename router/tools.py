"""Tool calls, in the format the model was trained on.

Everything about tool calls lives here: which format a model writes (detected
from its chat template, or set with TOOL_CALL_FORMAT), how tools reach a prompt
whose template cannot render them, the grammar that constrains a call, how a
stream holds a call back from the text it releases, and how a finished output
splits into text and calls.

The grammar is one of xgrammar's structural tags: under ``tool_choice: auto``
the output is free text until the format's trigger appears (``<tool_call>``,
``[TOOL_CALLS]``, ``{"name": ``), then calls whose function names are forced and
whose arguments follow the tools' JSON schemas, then the end: no text after the
calls (a model would invent the tools' results there). So the model may think
aloud (``<think>…</think>``) or answer in plain text, and only the calls are
constrained. ``required`` (or a named function) is calls only;
``parallel_tool_calls: false`` ends the output after the first call.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr

from protos import router_pb2 as pb
from router.errors import ValidationError
from router.grammar import json_schema_grammar, json_strings_only
from router.text_marks import partial_mark

#: (function name, arguments as a JSON text), as a finished output holds them.
Call = tuple[str, str]


@dataclass(frozen=True)
class ToolCallFormat:
    """How one family of models writes its calls."""

    name: str
    #: Where a call starts in the output; what the grammar watches for.
    trigger: str
    #: The structural tags of the calls to ``tools`` [(name, parameters schema)].
    tags: Callable[[list[tuple[str, dict[str, Any]]], bool], list[dict[str, Any]]]
    #: The calls in a text that starts with the trigger, and where they end; None if cut short.
    read: Callable[[str], tuple[list[Call], int] | None]
    #: An assistant message's calls as the model would have written them (for templates
    #: without tool support).
    write: Callable[[list[Call]], str]
    #: Between two calls; None when one tag holds every call (Mistral's array).
    separator: str | None


_JSON = json.JSONDecoder()


def _json_at(text: str, start: int) -> tuple[Any, int] | None:
    """The JSON value starting at ``start`` (after blanks) and the index after it; None if incomplete."""
    start += len(text[start:]) - len(text[start:].lstrip())
    try:
        return _JSON.raw_decode(text, start)
    except json.JSONDecodeError:
        return None


def _call(obj: Any, arguments_key: str = "arguments") -> Call | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", {}))
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    """A tag's content: JSON of ``schema`` written as response_format's is (no free whitespace, which
    a weak model could pad forever; strings hold only what JSON may)."""
    return {"type": "grammar", "grammar": json_schema_grammar(json.dumps(schema), "tools")}


def _named_tags(begin: str, end: str, arguments_key: str) -> Callable[..., list[dict[str, Any]]]:
    """One tag per function: the name is part of the forced prefix, the arguments follow the schema."""

    def tags(tools: list[tuple[str, dict[str, Any]]], parallel: bool) -> list[dict[str, Any]]:
        return [
            {
                "type": "tag",
                "begin": begin + json.dumps({"name": name})[:-1] + f', "{arguments_key}": ',
                "content": _json_content(schema),
                "end": "}" + end,
            }
            for name, schema in tools
        ]

    return tags


def _read_hermes(text: str) -> tuple[list[Call], int] | None:
    """``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` (Qwen, Hermes, SmolLM3, ...)."""
    found = _json_at(text, len("<tool_call>"))
    if found is None or (call := _call(found[0])) is None:
        return None
    rest = text[found[1] :]
    closing = rest.lstrip()
    if not closing.startswith("</tool_call>"):
        return None
    return [call], found[1] + len(rest) - len(closing) + len("</tool_call>")


def _read_llama3(text: str) -> tuple[list[Call], int] | None:
    """``{"name": ..., "parameters": ...}`` (Llama 3.1-3.3 with custom tools)."""
    found = _json_at(text, 0)
    if found is None or (call := _call(found[0], "parameters")) is None:
        return None
    return [call], found[1]


def _read_mistral(text: str) -> tuple[list[Call], int] | None:
    """``[TOOL_CALLS][{"name": ..., "arguments": ...}, ...]`` (Mistral, Mixtral)."""
    found = _json_at(text, len("[TOOL_CALLS]"))
    if found is None:
        return None
    items = found[0] if isinstance(found[0], list) else [found[0]]
    calls = [_call(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None], found[1]


def _mistral_tags(tools: list[tuple[str, dict[str, Any]]], parallel: bool) -> list[dict[str, Any]]:
    """One tag holding the JSON array of calls, as Mistral's templates write it."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": schema},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, schema in tools
    ]
    array: dict[str, Any] = {"type": "array", "items": {"anyOf": options}, "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    return [{"type": "tag", "begin": "[TOOL_CALLS]", "content": _json_content(array), "end": ""}]


def _write_json_calls(calls: list[Call], arguments_key: str) -> list[dict[str, Any]]:
    return [{"name": name, arguments_key: json.loads(arguments or "{}")} for name, arguments in calls]


HERMES = ToolCallFormat(
    "hermes",
    "<tool_call>",
    _named_tags("<tool_call>\n", "\n</tool_call>", "arguments"),
    _read_hermes,
    lambda calls: "\n".join(
        f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in _write_json_calls(calls, "arguments")
    ),
    "\n",
)
LLAMA3_JSON = ToolCallFormat(
    "llama3_json",
    '{"name": ',
    _named_tags("", "", "parameters"),
    _read_llama3,
    lambda calls: "; ".join(json.dumps(c) for c in _write_json_calls(calls, "parameters")),
    "; ",
)
MISTRAL = ToolCallFormat(
    "mistral",
    "[TOOL_CALLS]",
    _mistral_tags,
    _read_mistral,
    lambda calls: "[TOOL_CALLS]" + json.dumps(_write_json_calls(calls, "arguments")),
    None,
)
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}


def detect_format(chat_template: str) -> ToolCallFormat:
    """The format a chat template teaches; Hermes tags (the most widely trained) when it names none."""
    if "[TOOL_CALLS]" in chat_template:
        return MISTRAL
    if "<tool_call>" in chat_template:
        return HERMES
    if "tools" in chat_template and ('"parameters"' in chat_template or "<|python_tag|>" in chat_template):
        return LLAMA3_JSON
    return HERMES


def choose_format(configured: str, chat_template: str) -> ToolCallFormat:
    """TOOL_CALL_FORMAT: ``auto`` (from the template) or one of FORMATS."""
    if configured == "auto":
        return detect_format(chat_template)
    if configured not in FORMATS:
        raise SystemExit(f"TOOL_CALL_FORMAT must be auto or one of {sorted(FORMATS)}, got {configured!r}")
    return FORMATS[configured]


# --- the request side: which tools, and the grammar ----------------------------------


def calls_possible(chat: pb.Chat | None) -> bool:
    return chat is not None and bool(chat.tools) and chat.tool_choice != pb.TOOL_CHOICE_MODE_NONE


def template_tools(chat: pb.Chat) -> list[dict[str, Any]]:
    """The tools as chat templates take them (none under ``tool_choice: none``)."""
    if not calls_possible(chat):
        return []
    return [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": _schema(t)}}
        for t in chat.tools
    ]


def template_calls(calls: list[pb.ToolCall]) -> list[dict[str, Any]]:
    """An assistant message's calls as transformers' templates expect them (arguments parsed)."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments or "{}")}}
        for c in calls
    ]


def tool_grammar(fmt: ToolCallFormat, chat: pb.Chat) -> str:
    """The structural-tag grammar (EBNF) for a chat with tools; validates every schema first."""
    tools = [(t.name, _checked_schema(t, i)) for i, t in enumerate(chat.tools)]
    if chat.tool_choice == pb.TOOL_CHOICE_MODE_FUNCTION:
        tools = [t for t in tools if t[0] == chat.tool_choice_function]
        if not tools:
            raise ValidationError(
                f"tool_choice names {chat.tool_choice_function!r}, which is not among the tools", "tool_choice"
            )
    calls: dict[str, Any] = {
        "type": "tags_with_separator",
        "tags": fmt.tags(tools, chat.parallel_tool_calls),
        "separator": fmt.separator or "",
        "at_least_one": True,
        "stop_after_first": fmt.separator is None or not chat.parallel_tool_calls,
    }
    if chat.tool_choice == pb.TOOL_CHOICE_MODE_AUTO:
        # Text (a thought, an answer) until the trigger, then optionally the calls.
        text = {"type": "any_text", "excludes": [fmt.trigger]}
        output: dict[str, Any] = {"type": "sequence", "elements": [text, {"type": "optional", "content": calls}]}
    else:
        output = calls
    try:
        grammar = xgr.Grammar.from_structural_tag(json.dumps({"type": "structural_tag", "format": output}))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValidationError(f"the tools cannot be compiled: {str(exc).splitlines()[0]}", "tools") from exc
    return json_strings_only(str(grammar))


def _schema(tool: pb.Tool) -> dict[str, Any]:
    return json.loads(tool.parameters) if tool.parameters else {"type": "object", "properties": {}}


def _checked_schema(tool: pb.Tool, index: int) -> dict[str, Any]:
    param = f"tools[{index}].function.parameters"
    try:
        schema = _schema(tool)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"tool parameters are not JSON: {exc}", param=param) from exc
    json_schema_grammar(json.dumps(schema), param)  # a schema xgrammar cannot compile is a 400 naming the tool
    return schema


# --- the output side: holding calls back, splitting text from calls -------------------


class CallWatch:
    """Where a call starts in a stream's text, so that a call is never released as text.

    Text that could still be the start of the trigger is held back, as stop
    sequences are; from the trigger on, nothing more is released as text.
    """

    def __init__(self, fmt: ToolCallFormat):
        self.format = fmt
        self.start: int | None = None

    def releasable(self, text: str, emitted: int, end: int, final: bool) -> int:
        """How far ``text`` may be released (given ``end`` allowed by the stop sequences)."""
        if self.start is None:
            found = text.find(self.format.trigger, max(0, emitted - len(self.format.trigger)))
            if found >= 0:
                self.start = found
        if self.start is not None:
            return min(end, self.start)
        if final:
            return end
        return min(end, len(text) - partial_mark(text, self.format.trigger))

    def split(self, text: str) -> tuple[str, list[Call]] | None:
        """(text after the calls, the calls) of a finished output; None if a call was cut short."""
        if self.start is None:
            return None
        calls: list[Call] = []
        trailing: list[str] = []
        position = self.start
        trigger = self.format.trigger
        while position >= 0:
            read = self.format.read(text[position:])
            if read is None:
                return None
            found, length = read
            calls += found
            after = position + length
            position = text.find(trigger, after)
            between = text[after : position if position >= 0 else len(text)]
            # Llama 3 separates calls with "; ": a separator is not text.
            trailing.append(between.strip().strip(";").strip() if position >= 0 else between)
        return "".join(trailing).strip(), calls


def tool_calls_pb(calls: tuple[Call, ...]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=n, arguments=a) for n, a in calls]


# --- templates without tool support -----------------------------------------------------

#: How tools reach a model whose chat template does not render them (documented in the README).
TOOLS_SYSTEM_PROMPT = "You can call these functions:\n{tools}\nTo call one, write it like this:\n{example}"


def with_tools_in_text(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], fmt: ToolCallFormat
) -> list[dict[str, Any]]:
    """Tools in the system prompt, calls and results as text: for templates that cannot render them."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = [(c["function"]["name"], json.dumps(c["function"]["arguments"])) for c in m.pop("tool_calls")]
            m["content"] = (m.get("content") or "") + fmt.write(calls)
        if m.get("role") == "tool":
            m = {"role": "user", "content": f"Result of call {m.pop('tool_call_id', '')}: {m.get('content', '')}"}
        m["content"] = m.get("content") or ""
        out.append(m)
    if not tools:
        return out
    example = fmt.write([("function_name", '{"argument": "value"}')])
    prompt = TOOLS_SYSTEM_PROMPT.format(tools=json.dumps([t["function"] for t in tools], indent=1), example=example)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out
