"""The facade's pure parsers, without a stack: HTTP bodies -> router requests, or a 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings

from facade import params
from facade.embeddings import parse_embeddings
from facade.errors import ApiError
from facade.openai_chat import parse_chat
from facade.openai_completions import parse_completion
from facade.request_models import ChatCompletionRequest, CompletionRequest, fields_of, validate_body
from facade.responses_request import ResponseStore, parse_responses
from facade.tgi import parse_generate
from facade.tokenize import parse_detokenize, parse_tokenize
from protos import router_pb2 as pb
from tests.request_bodies import CHAT, COMPLETION, DETOKENIZE, EMBEDDINGS, GENERATE, RESPONSES, TOKENIZE

USER = [{"role": "user", "content": "hi"}]


def rejected(parse, body: Any) -> ApiError:  # type: ignore[no-untyped-def]
    with pytest.raises(ApiError) as error:
        parse(body)
    assert error.value.status == 400
    return error.value


# --- generated bodies: a result or a 400, nothing else -------------------------------------


@settings(max_examples=400, deadline=None)
@given(body=CHAT)
def test_any_chat_body_parses_or_is_a_400(body):
    _parses_or_400(parse_chat, body)


@settings(max_examples=400, deadline=None)
@given(body=COMPLETION)
def test_any_completion_body_parses_or_is_a_400(body):
    _parses_or_400(parse_completion, body)


@settings(max_examples=400, deadline=None)
@given(body=GENERATE)
def test_any_tgi_body_parses_or_is_a_400(body):
    _parses_or_400(parse_generate, body)


@settings(max_examples=400, deadline=None)
@given(body=RESPONSES)
def test_any_responses_body_parses_or_is_a_400(body):
    _parses_or_400(lambda b: parse_responses(b, ResponseStore()).chat, body)


@settings(max_examples=200, deadline=None)
@given(tokenize=TOKENIZE, detokenize=DETOKENIZE)
def test_any_tokenize_body_parses_or_is_a_400(tokenize, detokenize):
    _parses_or_400(parse_tokenize, tokenize)
    _parses_or_400(parse_detokenize, detokenize)


@settings(max_examples=300, deadline=None)
@given(body=EMBEDDINGS)
def test_any_embeddings_body_parses_or_is_a_400(body):
    _parses_or_400(lambda b: parse_embeddings(b)[1], body)


def _parses_or_400(parse, body: dict) -> None:  # type: ignore[no-untyped-def]
    try:
        parsed = parse(body)
    except ApiError as error:
        assert error.status == 400 and error.message
        return
    # What was accepted must also fit the protobuf messages it travels in.
    for message in _messages(parsed):
        message.SerializeToString()


def _messages(parsed: Any) -> list[Any]:
    if isinstance(parsed, tuple):  # parse_generate
        return [parsed[0]]
    if isinstance(parsed, list):  # parse_embeddings' router requests
        return parsed
    return list(getattr(parsed, "requests", [parsed]))


# --- shared sampling fields -----------------------------------------------------------------


def sampling(body: dict) -> pb.GenerationParameters:
    """A completion body's sampling fields as the handlers read them: validated, then converted."""
    req = validate_body(CompletionRequest, {"prompt": "x", **body})
    return params.parameters(req, req.max_tokens)


def test_sampling_fields_map_to_router_parameters():
    body = {"temperature": 0.5, "top_p": 0.9, "top_k": -1, "seed": -1, "stop": "x", "max_tokens": 7,
            "logit_bias": {"42": -100}, "min_tokens": 2, "ignore_eos": True}  # fmt: skip
    p = sampling(body)
    assert (p.temperature, p.top_k, p.seed, list(p.stop), p.max_new_tokens) == (0.5, 0, (1 << 64) - 1, ["x"], 7)
    assert dict(p.logit_bias) == {42: -100.0} and p.min_new_tokens == 2 and p.ignore_eos
    assert not sampling({}).HasField("temperature")  # absent: the model's defaults apply
    two_limits = {"messages": USER, "max_completion_tokens": 3, "max_tokens": 9}
    assert parse_chat(two_limits).requests[0].parameters.max_new_tokens == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [({"max_tokens": 10**12}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
     ({"top_k": 2**40}, "top_k"), ({"min_tokens": -1}, "min_tokens"), ({"temperature": "hot"}, "temperature"),
     ({"seed": 1.5}, "seed"), ({"stop": [1]}, "stop[0]"), ({"logit_bias": {"10000000000": 5}}, "logit_bias"),
     ({"logit_bias": {"x": 5}}, "logit_bias"), ({"logit_bias": {"5": True}}, "logit_bias")],
)  # fmt: skip
def test_wrong_sampling_fields_are_400s_naming_them(body, param):
    assert rejected(sampling, body).param == param


def test_fields_accepted_ignored_or_refused():
    params.check_fields({"user": "u", "metadata": {}, "best_of": 1}, fields_of(ChatCompletionRequest))
    assert "not supported yet" in rejected(lambda b: params.check_fields(b, frozenset()), {"audio": {}}).message
    assert "Unrecognized" in rejected(lambda b: params.check_fields(b, frozenset()), {"bogus": 1}).message


@pytest.mark.parametrize(
    ("value", "kind"),
    [({"type": "text"}, pb.RESPONSE_FORMAT_TYPE_TEXT), ({"type": "json_object"}, pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
     ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA),
     ({"type": "json", "value": {"type": "object"}}, pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA),
     ({"type": "regex", "value": "a+"}, pb.RESPONSE_FORMAT_TYPE_REGEX)],
)  # fmt: skip
def test_response_formats(value, kind):
    assert params.response_format(value).type == kind


@pytest.mark.parametrize("value", ["json", {"type": 3}, {"type": "json_schema", "json_schema": 5},
                                   {"type": "regex"}, {"type": "yaml"}])  # fmt: skip
def test_wrong_response_formats_are_400s(value):
    assert rejected(params.response_format, value).param.startswith("response_format")


# --- chat -------------------------------------------------------------------------------------


def test_chat_makes_one_request_per_choice_with_distinct_seeds():
    chat = parse_chat({"messages": USER, "n": 3, "seed": 5, "stream": True, "stream_options": {"include_usage": True}})
    assert [r.parameters.seed for r in chat.requests] == [5, 6, 7]
    assert chat.stream and chat.include_usage and chat.requests[0].chat.messages[0].content == "hi"


@pytest.mark.parametrize(
    ("body", "param"),
    [({"messages": []}, "messages"),
     ({"messages": [*USER, {"role": "tool", "tool_call_id": 5, "content": "x"}]}, "messages[1].tool_call_id"),
     ({"messages": [*USER, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
     ({"messages": [*USER, {"role": "tool", "tool_call_id": "", "content": "x"}]}, "messages[1].tool_call_id"),
     ({"messages": [*USER, {"role": "assistant", "tool_calls": 5}]}, "messages[1].tool_calls"),
     ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}],
       "tool_choice": {"type": "function", "function": "f"}}, "tool_choice.function"),
     ({"messages": USER, "top_logprobs": 3}, "top_logprobs"),
     ({"messages": USER, "n": 0}, "n"),
     ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
     ({"messages": USER, "functions": []}, "functions")],
)  # fmt: skip
def test_wrong_chat_bodies_are_400s_naming_the_field(body, param):
    assert rejected(parse_chat, body).param == param


# --- completions ------------------------------------------------------------------------------


def test_completion_prompt_forms():
    assert parse_completion({"prompt": "a"}).prompts == ["a"]
    assert parse_completion({"prompt": ["a", "b"], "n": 2}).requests[3].prompt == "b"
    assert parse_completion({"prompt": [1, 2]}).requests[0].prompt_ids.ids == [1, 2]
    assert parse_completion({"prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]


@pytest.mark.parametrize(
    "body",
    [{"prompt": [1099511627776]}, {"prompt": [-1]}, {"prompt": []}, {"prompt": [[]]}, {"prompt": 5},
     {"prompt": ["a"] * 1000, "n": 128}, {"prompt": ["a"] * 5000}],
)  # fmt: skip
def test_wrong_or_too_many_prompts_are_400s(body):
    assert rejected(parse_completion, body).param == "prompt"


# --- TGI and tokenize -------------------------------------------------------------------------


HI = [{"role": "user", "content": "hi"}]


def test_best_of_rules():
    """Completions: best_of >= n, at most MAX_BEST_OF, never streamed; chat has no best_of (as
    OpenAI's); TGI: sampling, no seed."""
    body = {"prompt": "x", "n": 2}
    parsed = parse_completion({**body, "best_of": 3})
    assert parsed.best_of == 3 and parsed.n == 2 and len(parsed.requests) == 3
    for bad in ({"best_of": 1}, {"best_of": params.MAX_BEST_OF + 1}, {"best_of": 3, "stream": True}):
        assert rejected(parse_completion, {**body, **bad}).param == "best_of"
    assert rejected(parse_chat, {"messages": HI, "best_of": 3}).param == "best_of"
    assert parse_chat({"messages": HI, "best_of": 2, "n": 2}).requests
    assert rejected(parse_generate, {"inputs": "x", "parameters": {"best_of": 2}}).param == "parameters.best_of"
    seeded = {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True, "seed": 1}}
    assert rejected(parse_generate, seeded).param == "parameters.seed"
    assert parse_generate({"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}})[1].best_of == 2


def test_tgi_parameters():
    message, given = parse_generate({"inputs": "x", "parameters": {"do_sample": True, "top_n_tokens": 2, "seed": 3}})
    p = message.parameters
    assert p.temperature == 1.0 and p.top_n_tokens == 2 and p.seed == 3 and given.do_sample
    assert parse_generate({"inputs": "x", "parameters": {"best_of": 1, "watermark": False}})[0].prompt == "x"
    greedy, _ = parse_generate({"inputs": "x"})
    assert greedy.parameters.temperature == 0.0


@pytest.mark.parametrize(
    ("body", "param"),
    [({"inputs": ""}, "inputs"), ({"inputs": "x", "parameters": {"max_new_tokens": -1}}, "parameters.max_new_tokens"),
     ({"inputs": "x", "parameters": {"top_k": -5}}, "parameters.top_k"),
     ({"inputs": "x", "parameters": {"top_n_tokens": -1}}, "parameters.top_n_tokens"),
     ({"inputs": "x", "parameters": {"best_of": 2}}, "parameters.best_of"),
     ({"inputs": "x", "parameters": {"bogus": 1}}, "parameters.bogus"),
     ({"inputs": "x", "parameters": 3}, "parameters")],
)  # fmt: skip
def test_wrong_tgi_bodies_are_400s_naming_the_field(body, param):
    assert rejected(parse_generate, body).param == param


def test_tokenize_bodies():
    assert parse_tokenize({"prompt": "hi"}).prompt == "hi"
    assert parse_tokenize({"messages": USER}).chat.messages[0].content == "hi"
    assert (
        rejected(parse_tokenize, {"messages": [{"role": "tool", "tool_call_id": 3}]}).param
        == "messages[0].tool_call_id"
    )
    assert rejected(parse_tokenize, {}).param == "prompt"
    assert parse_detokenize({"tokens": [1, 2]}).ids == [1, 2]
    assert rejected(parse_detokenize, {"tokens": [1099511627776]}).param == "tokens"


def test_openapi_documents_every_field_the_parsers_accept():
    """/openapi.json is generated from the request models, whose fields are what the parsers accept."""
    from facade import openai_chat, openai_completions, responses_request
    from facade.openapi import document

    schemas = document()["components"]["schemas"]
    for name, accepted in [
        ("ChatCompletionRequest", openai_chat._FIELDS),
        ("CompletionRequest", openai_completions._FIELDS),
        ("CreateResponse", responses_request.FIELDS),
    ]:
        documented = set(schemas[name]["properties"])
        assert set(accepted) <= documented, (name, sorted(set(accepted) - documented))
