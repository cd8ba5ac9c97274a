"""A reasoning model's thinking told from its answer, token by token (router.reasoning), with the
real tokenizer: tags split across tokens, thinking opened by the prompt or by the model, cut
short by max_tokens, followed by a tool call, and the REASONING_PARSER choices."""

from __future__ import annotations

import pytest
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string

from router.grammar import json_schema_grammar
from router.reasoning import REASONING_FORMATS, ReasoningWatch, after_thinking, reasoning_format, starts_inside
from router.stopping import StopCondition, TextStream
from router.tools import HERMES, CallWatch
from support.reasoning_templates import REASONING_TEMPLATES

THINK = REASONING_FORMATS["qwen3"]


def stream(tokenizer, inside: bool, max_new: int = 200, stops: tuple[str, ...] = ()) -> TextStream:
    s = TextStream(tokenizer.detokenizer([]), StopCondition(tokenizer.eos_token_ids, max_new, stops, False))
    s.reasoning = ReasoningWatch(THINK, inside)
    return s


def run(s: TextStream, tokenizer, text: str) -> tuple[str, str, list[str]]:
    """(answer, thinking, the thinking pieces as streamed) of ``text`` fed one token at a time."""
    answer, thinking = [], []
    for token in tokenizer.encode(text, add_special_tokens=False):
        answer.append(s.push(token))
        thinking.append(s.take_reasoning())
        if s.finish:
            break
    answer.append(s.unreleased() if s.finish and s.tool_calls() is None else "")
    return "".join(answer), "".join(thinking), thinking


@pytest.mark.parametrize(
    ("inside", "output", "thinking", "answer"),
    [
        (True, "Let me see. 2+2 is 4.</think>\n\nThe answer is 4.", "Let me see. 2+2 is 4.", "\n\nThe answer is 4."),
        (False, "<think>\nhmm, trains</think>The 8:15 to York.", "\nhmm, trains", "The 8:15 to York."),
        (False, "  <think>x</think>y", "x", "y"),
        (False, "No thinking here.", "", "No thinking here."),
        (False, "<b>bold</b> answer", "", "<b>bold</b> answer"),
        (True, "a < b and c </thin k> d</think>done", "a < b and c </thin k> d", "done"),
    ],
)
def test_thinking_and_answer_are_split(tokenizer, inside, output, thinking, answer):
    got_answer, got_thinking, pieces = run(stream(tokenizer, inside), tokenizer, output)
    assert (got_thinking, got_answer) == (thinking, answer)
    assert all(THINK.end not in p and THINK.start not in p for p in pieces)


def test_cut_short_inside_the_thinking_has_no_answer(tokenizer):
    s = stream(tokenizer, inside=True, max_new=5)
    answer, thinking, _ = run(s, tokenizer, "one two three four five six seven</think>answer")
    assert s.finish == "length" and answer == "" and thinking == "one two three four five"


def test_a_stop_sequence_in_the_thinking_ends_it(tokenizer):
    s = stream(tokenizer, inside=True, stops=("STOP",))
    answer, thinking, _ = run(s, tokenizer, "thinking STOP more</think>answer")
    assert s.finish == "stop_sequence" and thinking == "thinking " and answer == ""


def test_a_tool_call_after_the_thinking_is_a_call(tokenizer):
    s = stream(tokenizer, inside=False)
    s.calls = CallWatch(HERMES)
    call = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    text = f"<think>I should call it. <tool_call> is how.</think>{call}"
    answer, thinking, _ = run(s, tokenizer, text + "<|im_end|>")
    assert thinking == "I should call it. <tool_call> is how."
    made = s.tool_calls()
    assert made is not None and made[1] == [("f", '{"a": 1}')] and answer == ""


def test_where_the_output_starts_and_which_parser():
    assert starts_inside(THINK, "User: hi\nAssistant: <think>\n")
    assert not starts_inside(THINK, "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not starts_inside(THINK, "<|im_start|>assistant\n")
    for name, template in REASONING_TEMPLATES.items():
        assert reasoning_format("auto", template) is not None, name
    assert reasoning_format("auto", "{{ messages }}") is None
    assert reasoning_format("none", REASONING_TEMPLATES["qwen3"]) is None
    assert reasoning_format("deepseek_r1", "{{ messages }}") == REASONING_FORMATS["deepseek_r1"]


@pytest.mark.parametrize("inside", [True, False])
def test_a_constraint_applies_to_the_answer_after_the_thinking(inside):
    """json_schema after the thinking: free text up to </think> (which the prompt opened, or the
    model may open), whitespace, then only the schema's JSON."""
    schema = json_schema_grammar('{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}')
    grammar = xgr.Grammar.from_ebnf(after_thinking(schema, THINK, inside))
    opened = "" if inside else "<think>"
    assert accepts(grammar, f'{opened}Is {{"a": 1}} right? < </thin </think>\n\n{{"a": 1}}')
    assert not accepts(grammar, f'{opened}thinking</think>\n{{"a": "x"}}')
    assert not accepts(grammar, f"{opened}thinking</think>free text")
    assert accepts(grammar, '{"a": 2}') is (not inside)  # without thinking only where the model opens it


def accepts(grammar: xgr.Grammar, text: str) -> bool:
    return bool(_is_grammar_accept_string(grammar, text))
