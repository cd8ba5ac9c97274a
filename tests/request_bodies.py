"""Hypothesis strategies for request bodies of every HTTP route.

Each field a route reads gets plausible values and, as often, arbitrary JSON
(huge and negative integers, wrong types, NaN, nesting): the parsers must
answer every one with a result or a 400, never a fault.
"""

from __future__ import annotations

from hypothesis import strategies as st

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, 1, -1, 2, 20, 2**31, 2**32, 2**63, 2**64, 10**12, -(2**40)]),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def field(plausible: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(plausible, plausible, ANY_JSON)


SMALL = st.integers(-2, 40)
UNIT = st.floats(-0.5, 2.5, allow_nan=False)
TOOL_CALL = st.fixed_dictionaries(
    {"id": field(st.text(max_size=6)), "type": field(st.just("function"))},
    optional={
        "function": field(st.fixed_dictionaries({"name": st.text(max_size=6), "arguments": st.text(max_size=12)}))
    },
)
MESSAGE = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"]))},
    optional={
        "content": field(
            st.text(max_size=30)
            | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2)
        ),
        "tool_calls": field(st.lists(TOOL_CALL, max_size=2)),
        "tool_call_id": field(st.text(max_size=6)),
        "name": field(st.text(max_size=6)),
    },
)
TOOL = st.fixed_dictionaries(
    {"type": field(st.just("function"))},
    optional={
        "function": field(
            st.fixed_dictionaries(
                {"name": st.text(min_size=1, max_size=6)}, optional={"parameters": field(st.just({"type": "object"}))}
            )
        )
    },
)
RESPONSE_FORMAT = field(
    st.sampled_from(
        [
            {"type": "text"},
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
            {"type": "regex", "value": "(("},
        ]
    )
)
SAMPLING = {
    "model": field(st.text(max_size=6)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "max_tokens": field(SMALL),
    "temperature": field(UNIT),
    "top_p": field(UNIT),
    "top_k": field(SMALL),
    "min_p": field(UNIT),
    "seed": field(st.integers(-5, 2**64)),
    "n": field(st.integers(-1, 4)),
    "stop": field(st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=5)),
    "frequency_penalty": field(UNIT),
    "presence_penalty": field(UNIT),
    "repetition_penalty": field(UNIT),
    "logit_bias": field(st.dictionaries(st.sampled_from(["1", "5", "-3", "99999999", "x"]), SMALL, max_size=2)),
    "ignore_eos": field(st.booleans()),
    "min_tokens": field(SMALL),
    "response_format": RESPONSE_FORMAT,
    "user": field(st.text(max_size=6)),
    "truncate_prompt_tokens": field(st.integers(-2, 2**33)),
    "priority": field(st.integers(-(2**33), 2**33)),
    "best_of": field(st.integers(-1, 20)),
    "prompt_logprobs": field(st.integers(-1, 25)),
}
TEMPLATE_KWARGS = field(
    st.dictionaries(st.sampled_from(["enable_thinking", "tokenize", "x"]), st.booleans() | SMALL, max_size=2)
)
CHAT = st.fixed_dictionaries(
    {"messages": field(st.lists(MESSAGE, min_size=0, max_size=3))},
    optional={
        **SAMPLING,
        "max_completion_tokens": field(SMALL),
        "logprobs": field(st.booleans()),
        "top_logprobs": field(SMALL),
        "tools": field(st.lists(TOOL, max_size=2)),
        "tool_choice": field(
            st.sampled_from(["none", "auto", "required", {"type": "function", "function": {"name": "f"}}])
        ),
        "parallel_tool_calls": field(st.booleans()),
        "chat_template_kwargs": TEMPLATE_KWARGS,
    },
)
COMPLETION = st.fixed_dictionaries(
    {"prompt": field(st.text(max_size=20) | st.lists(st.text(max_size=8), max_size=3) | st.lists(SMALL, max_size=5))},
    optional={
        **SAMPLING,
        "echo": field(st.booleans()),
        "logprobs": field(st.integers(-1, 6)),
        "suffix": field(st.text(max_size=4)),
    },
)
TGI_PARAMETERS = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": field(SMALL),
        "temperature": field(UNIT),
        "top_k": field(SMALL),
        "top_p": field(UNIT),
        "typical_p": field(UNIT),
        "repetition_penalty": field(UNIT),
        "seed": field(st.integers(-5, 2**64)),
        "do_sample": field(st.booleans()),
        "stop": field(st.lists(st.text(max_size=4), max_size=5)),
        "details": field(st.booleans()),
        "decoder_input_details": field(st.booleans()),
        "top_n_tokens": field(st.integers(-1, 8)),
        "return_full_text": field(st.booleans()),
        "truncate": field(SMALL),
        "best_of": field(st.integers(-1, 20)),
        "watermark": field(st.booleans()),
        "grammar": RESPONSE_FORMAT,
    },
)
GENERATE = st.fixed_dictionaries(
    {"inputs": field(st.text(max_size=20))},
    optional={"parameters": field(TGI_PARAMETERS), "stream": field(st.booleans())},
)
TOKENIZE = st.fixed_dictionaries(
    {},
    optional={
        "prompt": field(st.text(max_size=20)),
        "messages": field(st.lists(MESSAGE, max_size=2)),
        "add_special_tokens": field(st.booleans()),
        "chat_template_kwargs": TEMPLATE_KWARGS,
    },
)
EMBEDDINGS = st.fixed_dictionaries(
    {"input": field(st.text(max_size=20) | st.lists(st.text(max_size=8), max_size=3) | st.lists(SMALL, max_size=5))},
    optional={
        "model": field(st.text(max_size=6)),
        "encoding_format": field(st.sampled_from(["float", "base64", "hex"])),
        "dimensions": field(st.integers(-1, 80)),
        "normalize": field(st.booleans()),
        "truncate_prompt_tokens": field(st.integers(-2, 2**33)),
        "priority": field(st.integers(-(2**33), 2**33)),
    },
)
DETOKENIZE = st.fixed_dictionaries({"tokens": field(st.lists(SMALL, max_size=5))})

RESPONSE_ITEM = st.one_of(
    MESSAGE,
    st.fixed_dictionaries(
        {"type": st.just("function_call"), "call_id": field(st.text(max_size=6)), "name": field(st.text(max_size=6)),
         "arguments": field(st.text(max_size=12))}
    ),
    st.fixed_dictionaries(
        {"type": st.just("function_call_output"), "call_id": field(st.text(max_size=6)),
         "output": field(st.text(max_size=12))}
    ),
)  # fmt: skip
RESPONSE_TOOL = st.fixed_dictionaries(
    {"type": field(st.just("function")), "name": field(st.text(min_size=1, max_size=6))}
)
RESPONSES = st.fixed_dictionaries(
    {"input": field(st.text(max_size=20) | st.lists(RESPONSE_ITEM, max_size=3))},
    optional={
        "model": field(st.text(max_size=6)),
        "instructions": field(st.text(max_size=10)),
        "max_output_tokens": field(SMALL),
        "temperature": field(UNIT),
        "top_p": field(UNIT),
        "stream": field(st.booleans()),
        "tools": field(st.lists(RESPONSE_TOOL, max_size=2)),
        "tool_choice": field(st.sampled_from(["none", "auto", "required", {"type": "function", "name": "f"}])),
        "text": field(st.fixed_dictionaries({"format": RESPONSE_FORMAT})),
        "previous_response_id": field(st.text(max_size=8)),
        "store": field(st.booleans()),
        "metadata": field(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)),
        "reasoning": field(st.just({})),
        "truncation": field(st.sampled_from(["disabled", "auto"])),
    },
)  # fmt: skip

ROUTES = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETION,
    "/v1/responses": RESPONSES,
    "/v1/embeddings": EMBEDDINGS,
    "/generate": GENERATE,
    "/generate_stream": GENERATE,
    "/": GENERATE,
    "/tokenize": TOKENIZE,
    "/detokenize": DETOKENIZE,
}
REQUESTS = st.one_of(
    *(st.tuples(st.just(path), body) for path, body in ROUTES.items()),
    st.tuples(st.sampled_from(sorted(ROUTES)), ANY_JSON),  # the body is not what the route expects at all
)
