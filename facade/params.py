"""OpenAI request fields shared by chat and text completions -> router GenerationParameters.

Types and ranges are the request models' (``facade.request_models``, validated
before); what is left here is what a type cannot say: unknown and unsupported
fields, logit_bias keys that must name token ids, stream_options without stream.
The router checks value ranges again for gRPC callers, with the same table.
"""

from __future__ import annotations

import json
from typing import Any

from facade.errors import invalid
from facade.request_models import UINT32_MAX, SamplingFields
from protos import router_pb2 as pb

#: Most sequences one request may ask for (prompts x n): each is a router call.
MAX_SEQUENCES = 256
#: Most candidates best_of may ask for per prompt (TGI's /info reports it as max_best_of).
MAX_BEST_OF = 16


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
    for key in body:
        if key in allowed:
            continue
        if key in NOT_SUPPORTED or key == "response_format":
            raise invalid(f"'{key}' is not supported yet", key)
        raise invalid(f"Unrecognized request argument supplied: {key}", key)


def best_of_count(best_of: int | None, n: int, stream: bool) -> int:
    """Candidates per prompt: ``best_of`` (at least ``n``; not streamed when above it), else ``n``."""
    if best_of is None or best_of == n:
        return n
    if best_of < n:
        raise invalid(f"best_of must be at least n ({n}), got {best_of}", "best_of")
    if best_of > MAX_BEST_OF:
        raise invalid(f"best_of must be at most {MAX_BEST_OF}, got {best_of}", "best_of")
    if stream:
        raise invalid("best_of cannot be streamed: the best candidates are known only at the end", "best_of")
    return best_of


def ask_prompt_logprobs(p: pb.GenerationParameters, alternatives: int | None, stream: bool) -> None:
    """vLLM's prompt_logprobs (``alternatives`` per prompt token); the router's top_n_tokens
    serves both the prompt and the output, so it is the larger count, each trimmed on output."""
    if alternatives is None:
        return
    if stream:
        raise invalid("prompt_logprobs is not available when stream is true", "prompt_logprobs")
    p.prompt_logprobs = True
    p.top_n_tokens = max(p.top_n_tokens, alternatives)


def vllm_prompt_logprobs(tokens: Any, alternatives: int) -> list[dict[str, Any] | None]:
    """vLLM's prompt_logprobs list: None for the first token, then per token a map from token id
    to logprob, rank and text, holding the token itself and its ``alternatives`` most likely."""
    entries: list[dict[str, Any] | None] = [None]
    for t in list(tokens)[1:]:
        entry = {str(t.id): {"logprob": t.logprob, "rank": t.rank, "decoded_token": t.text}}
        for rank, a in enumerate(t.top[:alternatives], 1):
            entry.setdefault(str(a.id), {"logprob": a.logprob, "rank": rank, "decoded_token": a.text})
        entries.append(entry)
    return entries


def include_usage(req: SamplingFields) -> bool:
    if req.stream_options is None:
        return False
    if not req.stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    return bool(req.stream_options.include_usage)


def parameters(req: SamplingFields, max_tokens: int | None) -> pb.GenerationParameters:
    """The router parameters of a validated chat or completion body (types and ranges are the
    request model's; value ranges the router also enforces for gRPC callers)."""
    p = pb.GenerationParameters()
    # Absent sampling fields stay absent: the router fills in the model's recommended defaults.
    for key in ("temperature", "top_p", "typical_p", "repetition_penalty"):
        if (value := getattr(req, key)) is not None:
            setattr(p, key, value)
    p.min_p = req.min_p or 0.0
    p.frequency_penalty = req.frequency_penalty or 0.0
    p.presence_penalty = req.presence_penalty or 0.0
    if req.top_k is not None:
        p.top_k = max(0, req.top_k)  # -1 means off, as in vLLM
    if req.seed is not None:
        p.seed = req.seed % (1 << 64)
    if max_tokens is not None:
        p.max_new_tokens = max_tokens
    p.stop.extend([req.stop] if isinstance(req.stop, str) else req.stop or [])
    p.ignore_eos = bool(req.ignore_eos)
    if req.min_tokens is not None:
        p.min_new_tokens = req.min_tokens
    for token, bias in _logit_bias(req.logit_bias or {}).items():
        p.logit_bias[token] = bias
    if req.truncate_prompt_tokens is not None:
        p.truncate = truncation(req.truncate_prompt_tokens)
    p.priority = req.priority or 0
    return p


def truncation(truncate_prompt_tokens: int) -> int:
    """vLLM's truncate_prompt_tokens as the router's truncate: N keeps the last N tokens, -1 (as 0
    for the router) the last MAX_INPUT_TOKENS."""
    if truncate_prompt_tokens == 0:
        raise invalid(
            "truncate_prompt_tokens must be at least 1, or -1 for the model's limit", "truncate_prompt_tokens"
        )
    return max(0, truncate_prompt_tokens)


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    """Token ids are JSON object keys, so strings: each must name a token id."""
    result = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= token <= UINT32_MAX:
            raise invalid("logit_bias maps token ids to numbers in [-100, 100]", "logit_bias")
        result[token] = value
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
