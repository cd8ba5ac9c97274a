"""Tool calls in each model family's own format: detection, grammar, streaming, parsing."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr
from transformers import AutoTokenizer

from protos import router_pb2 as pb
from router.config import Limits
from router.stopping import StopCondition, TextStream
from router.tokenization import Tokenizer
from router.tools import FORMATS, HERMES, LLAMA3_JSON, MISTRAL, CallWatch, choose_format, detect_format, tool_grammar
from router.validation import Validator

WEATHER = json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
CALL = ("get_weather", '{"city": "Paris"}')
SECOND = ("get_time", "{}")

# Short templates written here, each teaching a format as its family's templates do.
TEMPLATES = {
    "{% if tools %}Wrap calls in <tool_call></tool_call> tags.{% endif %}": HERMES,
    '{% if tools %}Respond with {"name": function name, "parameters": dictionary}{% endif %}': LLAMA3_JSON,
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools }}{% endif %}{{ '[TOOL_CALLS]' }}": MISTRAL,
    "{% for m in messages %}{{ m.content }}{% endfor %}": HERMES,  # no tool support: the fallback
}


def chat(choice: int = pb.TOOL_CHOICE_MODE_AUTO, parallel: bool = True, function: str = "") -> pb.Chat:
    tools = [pb.Tool(name="get_weather", parameters=WEATHER), pb.Tool(name="get_time")]
    ask = [pb.ChatMessage(role="user", content="Weather in Paris?")]
    return pb.Chat(
        messages=ask, tools=tools, tool_choice=choice, parallel_tool_calls=parallel, tool_choice_function=function
    )


def accepts(grammar: str, text: str) -> bool:
    matcher = xgr.GrammarMatcher(
        xgr.GrammarCompiler(xgr.TokenizerInfo(["a"]), max_threads=1).compile_grammar(xgr.Grammar.from_ebnf(grammar))
    )
    return bool(matcher._handle.accept_string(text.encode(), False))  # as a prefix of an output


@pytest.mark.parametrize(("template", "expected"), TEMPLATES.items())
def test_the_format_is_read_from_the_chat_template(template, expected):
    assert detect_format(template) is expected
    assert choose_format("auto", template) is expected


def test_a_configured_format_wins_and_a_wrong_name_stops_the_start():
    assert choose_format("mistral", "<tool_call>") is MISTRAL
    with pytest.raises(SystemExit, match="TOOL_CALL_FORMAT"):
        choose_format("json", "")


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_auto_admits_text_and_thinking_around_native_calls(fmt):
    grammar = tool_grammar(fmt, chat())
    call = fmt.write([CALL])
    assert accepts(grammar, call)
    assert accepts(grammar, "<think>the user wants weather</think>" + call)
    assert accepts(grammar, "<b>plain</b> text")  # may start with "<" (it could not before)
    wrong_name = fmt.write([("get_wether", '{"city": "Paris"}')])
    wrong_args = fmt.write([("get_weather", '{"town": "Paris"}')])
    assert not accepts(grammar, wrong_name) and not accepts(grammar, wrong_args)
    assert not accepts(grammar, call + " It is sunny in Paris.")  # no invented results after the calls


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_required_and_named_choices_start_with_a_call(fmt):
    required = tool_grammar(fmt, chat(pb.TOOL_CHOICE_MODE_REQUIRED, parallel=False))
    assert accepts(required, fmt.write([CALL])) and not accepts(required, "Sure! " + fmt.write([CALL]))
    assert not accepts(required, fmt.write([CALL, SECOND]))  # parallel_tool_calls: false
    named = tool_grammar(fmt, chat(pb.TOOL_CHOICE_MODE_FUNCTION, function="get_time"))
    assert accepts(named, fmt.write([SECOND])) and not accepts(named, fmt.write([CALL]))


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_streamed_text_never_shows_a_call_and_the_calls_are_read_back(fmt, tokenizer):
    output = "Let me check. " + fmt.write([CALL, SECOND])
    stream = TextStream(tokenizer.detokenizer([]), StopCondition(frozenset(), 10_000, (), False), calls=CallWatch(fmt))
    released = ""
    for token in tokenizer.encode(output, add_special_tokens=False):
        released += stream.push(token)
    stream.finish = "stop"
    assert released == "Let me check. "
    assert stream.tool_calls() == ("", [CALL, SECOND])


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_a_call_cut_short_is_not_a_call(fmt):
    output = fmt.write([CALL])[:-4]
    watch = CallWatch(fmt)
    watch.releasable(output, 0, len(output), final=True)
    assert watch.split(output) is None


def test_text_that_might_start_a_trigger_is_held_until_it_cannot():
    watch = CallWatch(HERMES)
    assert watch.releasable("Hello <tool", 0, 11, final=False) == 6
    assert watch.releasable("Hello <tool", 0, 11, final=True) == 11
    assert watch.releasable("Hello <b>", 0, 9, final=False) == 9


def test_a_special_token_trigger_survives_detokenization(tiny_model_dir):
    """Mistral's [TOOL_CALLS] is a special token, which plain detokenization drops."""
    hf = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    hf.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    tokenizer = Tokenizer(hf, frozenset({2}))
    validator = Validator(tokenizer, Limits(1000, 2000, 1000, 8), 4, tool_format=MISTRAL)
    request = validator.request(1, pb.GenerateRequest(chat=chat(), parameters=pb.GenerationParameters()))
    output = tokenizer.encode(MISTRAL.write([CALL]), add_special_tokens=False)
    assert output[0] == hf.convert_tokens_to_ids("[TOOL_CALLS]")
    released = "".join(request.stream.push(t) for t in output)
    request.stream.finish = "stop"
    assert released == "" and request.stream.tool_calls() == ("", [CALL])


def test_templates_without_tools_learn_the_format_from_the_system_prompt(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": json.loads(WEATHER)}}]
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"function": {"name": CALL[0], "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]  # fmt: skip
    for fmt in FORMATS.values():
        prompt = tokenizer.render_chat(history, tools, fmt)
        assert fmt.write([("function_name", '{"argument": "value"}')]) in prompt
        assert fmt.write([CALL]) in prompt and "sunny" in prompt
