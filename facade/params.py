"""OpenAI request fields shared by chat and text completions -> router GenerationParameters.

Type and shape checks live here (a wrong JSON type is a 400 naming the field);
value ranges are checked once, by the router, for HTTP and gRPC callers alike.
"""

from __future__ import annotations

import json
from typing import Any

from facade.errors import invalid
from protos import router_pb2 as pb

MAX_N = 128  # as OpenAI
#: Largest value of the protobuf uint32 fields counts and token ids travel in.
UINT32_MAX = (1 << 32) - 1
#: Most sequences one request may ask for (prompts x n): each is a router call.
MAX_SEQUENCES = 256


def typed(body: dict, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    # bool is an int in Python, but a JSON true is never a number here.
    is_bool = isinstance(value, bool)
    wants_bool = kind is bool or (isinstance(kind, tuple) and bool in kind)
    if not isinstance(value, kind) or (is_bool and not wants_bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise invalid(f"'{key}' must be of type {names}, got {type(value).__name__}", key)
    return value


def count(body: dict, key: str, low: int, default: int | None = None) -> int | None:
    """An integer field in [low, 2^32 - 1] (what its protobuf field holds), or a 400 naming it."""
    value = typed(body, key, int)
    if value is None:
        return default
    if not low <= value <= UINT32_MAX:
        raise invalid(f"'{key}' must be between {low} and {UINT32_MAX}, got {value}", key)
    return value


def token_ids(value: Any) -> bool:
    """Whether ``value`` is a list of token ids (integers a uint32 holds)."""
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= UINT32_MAX for t in value
    )


#: OpenAI parameters that would change the output and are not implemented yet.
NOT_SUPPORTED = frozenset(
    {"functions", "function_call", "audio", "modalities", "prediction",
     "web_search_options", "reasoning_effort", "suffix", "verbosity"}
)  # fmt: skip


def check_fields(body: dict, allowed: frozenset[str]) -> None:
    """Names unknown and unsupported fields (``allowed``: a request model's fields)."""
    for key, value in body.items():
        if key == "best_of" and value not in (None, 1, body.get("n", 1)):
            raise invalid(f"'{key}' is not supported yet", key)
        if key in allowed:
            continue
        if key in NOT_SUPPORTED or key == "response_format":
            raise invalid(f"'{key}' is not supported yet", key)
        raise invalid(f"Unrecognized request argument supplied: {key}", key)


def choices_count(body: dict) -> int:
    n = typed(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise invalid(f"'n' must be between 1 and {MAX_N}", "n")
    return n


def include_usage(body: dict, stream: bool) -> bool:
    options = typed(body, "stream_options", dict)
    if options is None:
        return False
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    return bool(typed(options, "include_usage", bool, False))


def parameters(body: dict, max_tokens_key: str = "max_tokens") -> pb.GenerationParameters:
    p = pb.GenerationParameters()
    # Absent sampling fields stay absent: the router fills in the model's recommended defaults.
    for key in ("temperature", "top_p", "typical_p", "repetition_penalty"):
        if (value := typed(body, key, (int, float))) is not None:
            setattr(p, key, float(value))
    for key in ("min_p", "frequency_penalty", "presence_penalty"):
        setattr(p, key, float(typed(body, key, (int, float), 0.0)))
    if body.get("top_k") == -1:  # -1 means off, as in vLLM
        p.top_k = 0
    elif (top_k := count(body, "top_k", 0)) is not None:
        p.top_k = top_k
    if (seed := typed(body, "seed", int)) is not None:
        p.seed = seed % (1 << 64)
    max_tokens = count(body, max_tokens_key, 1)
    if max_tokens is None and max_tokens_key != "max_tokens":
        max_tokens = count(body, "max_tokens", 1)
    if max_tokens is not None:
        p.max_new_tokens = max_tokens
    p.stop.extend(_stop(body))
    p.ignore_eos = typed(body, "ignore_eos", bool, False)
    if (min_tokens := count(body, "min_tokens", 0)) is not None:
        p.min_new_tokens = min_tokens
    for token, bias in _logit_bias(body).items():
        p.logit_bias[token] = bias
    return p


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise invalid("'stop' must be a string or an array of strings", "stop")


def _logit_bias(body: dict) -> dict[int, float]:
    bias = typed(body, "logit_bias", dict, {})
    result = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= token <= UINT32_MAX or isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid("logit_bias maps token ids to numbers in [-100, 100]", "logit_bias")
        result[token] = float(value)
    return result


def response_format(value: Any, param: str = "response_format") -> pb.ResponseFormat:
    """OpenAI's response_format (text, json_object, json_schema) and TGI's grammar forms (json, regex)."""
    if value is None:
        return pb.ResponseFormat()
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid(f"'{param}' must be an object with a 'type'", param)
    kind = value["type"]
    if kind == "text":
        return pb.ResponseFormat()
    if kind == "json_object":
        return pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise invalid("json_schema must be an object with a 'schema' object", f"{param}.json_schema")
        schema = json.dumps(spec.get("schema") or {"type": "object"})
        return pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, value=schema)
    if kind == "json":  # TGI
        given = value.get("value")
        if not isinstance(given, dict | str):
            raise invalid("a json grammar needs a schema in 'value'", f"{param}.value")
        text = given if isinstance(given, str) else json.dumps(given)
        return pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, value=text)
    if kind == "regex":  # TGI
        pattern = value.get("value")
        if not isinstance(pattern, str):
            raise invalid("a regex grammar needs the pattern in 'value'", f"{param}.value")
        return pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_REGEX, value=pattern)
    raise invalid(f"unknown {param} type {kind!r}", f"{param}.type")


def per_choice(p: pb.GenerationParameters, n: int) -> list[pb.GenerationParameters]:
    """Parameters of n choices: distinct seeds when a seed is given, so that choices still differ."""
    choices = []
    for i in range(n):
        choice = pb.GenerationParameters()
        choice.CopyFrom(p)
        if p.HasField("seed"):
            choice.seed = (p.seed + i) % (1 << 64)
        choices.append(choice)
    return choices
