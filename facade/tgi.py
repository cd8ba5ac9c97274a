"""TGI's native API: ``/generate``, ``/generate_stream``, ``/`` (compat) and ``/info``.

So that TGI users, and ``huggingface_hub.InferenceClient.text_generation``, work unchanged.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
from aiohttp import web

from common.sampling_fields import BY_NAME
from facade import sse
from facade.choices import StreamSet, best_of, generate_all, router_info
from facade.errors import invalid
from facade.json_body import json_response, read_json
from facade.params import MAX_BEST_OF, response_format
from facade.request_models import GenerateParameters, GenerateRequest, fields_of, validate_body
from facade.state import ROUTER
from protos import router_pb2 as pb

TGI_FINISH = {
    pb.FINISH_REASON_TOOL_CALLS: "eos_token",
    pb.FINISH_REASON_STOP: "eos_token",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    pb.FINISH_REASON_LENGTH: "length",
}
_ACCEPTED = fields_of(GenerateParameters)
#: Accepted only at their neutral value: anything else would change the output and is not implemented.
_NEUTRAL: dict[str, Any] = {"watermark": False}


def parse_generate(body: Any) -> tuple[pb.GenerateRequest, GenerateParameters]:
    """A TGI body (``inputs``, ``parameters``) -> the router request, and the parameters given."""
    raw = body.get("parameters") if isinstance(body, dict) else None
    for key, value in (raw or {}).items() if isinstance(raw, dict) else ():
        if value is None:
            continue
        if key not in _ACCEPTED:
            raise invalid(f"unknown parameter '{key}'", f"parameters.{key}")
        if key in _NEUTRAL and value != _NEUTRAL[key]:
            raise invalid(f"'{key}' is not supported yet", f"parameters.{key}")
    req = validate_body(GenerateRequest, body)
    if not req.inputs:
        raise invalid("'inputs' must be a non-empty string", "inputs")
    given = req.parameters or GenerateParameters.model_validate({})
    sampling = bool(given.do_sample) or any(
        (value := getattr(given, key)) is not None and value != BY_NAME[key].neutral
        for key in ("temperature", "top_k", "top_p", "typical_p")
    )
    temperature = given.temperature if given.temperature is not None else 1.0
    p = pb.GenerationParameters(temperature=temperature if sampling else 0.0)
    for key in ("top_p", "typical_p", "repetition_penalty"):
        if (value := getattr(given, key)) is not None:
            setattr(p, key, value)
    p.frequency_penalty = given.frequency_penalty or 0.0
    p.top_k = given.top_k or 0
    if given.seed is not None:
        p.seed = given.seed % (1 << 64)
    if given.max_new_tokens is not None:
        p.max_new_tokens = given.max_new_tokens
    p.stop.extend(given.stop or [])
    p.top_n_tokens = given.top_n_tokens or 0
    if given.truncate is not None:
        p.truncate = given.truncate
    p.logprobs = True  # TGI reports every token's text
    grammar = given.grammar.model_dump(exclude_none=True) if given.grammar is not None else None
    p.response_format.CopyFrom(response_format(grammar, "grammar"))
    _check_best_of(given, sampling)
    p.prompt_logprobs = bool(given.decoder_input_details)
    return pb.GenerateRequest(prompt=req.inputs, parameters=p, adapter=given.adapter_id or ""), given


def _check_best_of(given: GenerateParameters, sampling: bool) -> None:
    """TGI's rules for best_of > 1: sampling, no seed (each candidate has its own), at most
    MAX_BEST_OF; not streamed (checked by the streaming routes)."""
    if (given.best_of or 1) == 1:
        return
    if not sampling:
        raise invalid("you must use sampling when best_of is > 1", "parameters.best_of")
    if given.seed is not None:
        raise invalid("seed must not be set when best_of > 1", "parameters.seed")
    if given.best_of > MAX_BEST_OF:  # type: ignore[operator]
        raise invalid(f"best_of must be at most {MAX_BEST_OF}, got {given.best_of}", "parameters.best_of")


def _not_streamed(given: GenerateParameters) -> None:
    if (given.best_of or 1) > 1:
        raise invalid("best_of != 1 is not supported when streaming tokens", "parameters.best_of")
    if given.decoder_input_details:
        raise invalid(
            "decoder_input_details == true is not supported when streaming tokens", "parameters.decoder_input_details"
        )


def _token(t: Any) -> dict[str, Any]:
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}


def _top_token(t: Any) -> dict[str, Any]:
    # router TopToken has no ``special``: the alternatives are reported as TGI does, as plain text.
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": False}


def _details(answer: Any, tokens: list, seed: int | None, top_n: int) -> dict[str, Any]:
    details: dict[str, Any] = {
        "finish_reason": TGI_FINISH[answer.finish_reason],
        "generated_tokens": answer.usage.completion_tokens,
        "seed": seed,
        # decoder_input_details: each prompt token, its logprob given those before (none for the first).
        "prefill": [
            {"id": t.id, "text": t.text, "logprob": None if k == 0 else t.logprob}
            for k, t in enumerate(answer.prompt_tokens)
        ],
        "tokens": [_token(t) for t in tokens],
    }
    if top_n:
        details["top_tokens"] = [[_top_token(a) for a in t.top] for t in tokens]
    return details


async def generate(request: web.Request) -> web.Response:
    message, given = parse_generate(await read_json(request))
    return json_response(await _generate(request, message, given))


async def _generate(request: web.Request, message: pb.GenerateRequest, given: GenerateParameters) -> dict[str, Any]:
    """/generate's body; best_of > 1: the most likely of that many candidates (each with a seed of
    its own, reported), the others in ``details.best_of_sequences``."""
    prefix = message.prompt if given.return_full_text else ""
    top_n = message.parameters.top_n_tokens
    if (given.best_of or 1) > 1:
        candidates = []
        for _ in range(given.best_of or 1):
            candidate = pb.GenerateRequest()
            candidate.CopyFrom(message)
            candidate.parameters.seed = random.getrandbits(63)
            candidates.append(candidate)
        (i, best), *rest = await best_of(request.app[ROUTER], candidates)
        body: dict[str, Any] = {"generated_text": prefix + best.text}
        if given.details:
            body["details"] = _details(best, list(best.tokens), candidates[i].parameters.seed, top_n)
            body["details"]["best_of_sequences"] = [
                {"generated_text": prefix + a.text} | _details(a, list(a.tokens), candidates[k].parameters.seed, top_n)
                for k, a in rest
            ]
        return body
    [answer] = await generate_all(request.app[ROUTER], [message])
    body = {"generated_text": prefix + answer.text}
    if given.details:
        seed = message.parameters.seed if message.parameters.temperature > 0 else None
        body["details"] = _details(answer, list(answer.tokens), seed, top_n)
    return body


async def generate_stream(request: web.Request) -> web.StreamResponse:
    message, given = parse_generate(await read_json(request))
    _not_streamed(given)
    return await _stream(request, message, given)


async def _stream(request: web.Request, message: pb.GenerateRequest, given: GenerateParameters) -> web.StreamResponse:
    streams = StreamSet(request.app[ROUTER], [message])
    await streams.start()
    response = await sse.open_stream(request, sse.TGI)
    text = message.prompt if given.return_full_text else ""
    try:
        async for _, m in streams.messages():
            text += m.text
            for k, t in enumerate(m.tokens):
                last = m.finish_reason and k == len(m.tokens) - 1
                event: dict[str, Any] = {"index": 0, "token": _token(t), "generated_text": None, "details": None}
                if message.parameters.top_n_tokens:
                    event["top_tokens"] = [_top_token(a) for a in t.top]
                if last:
                    event["generated_text"] = text
                    event["details"] = {
                        "finish_reason": TGI_FINISH[m.finish_reason],
                        "generated_tokens": m.usage.completion_tokens,
                        "seed": message.parameters.seed if message.parameters.temperature > 0 else None,
                    }
                await response.write(b"data:" + orjson.dumps(event) + b"\n\n")
    finally:
        streams.close()
    return response


async def compat(request: web.Request) -> web.StreamResponse:
    """``POST /``: /generate_stream when ``stream`` is true, else /generate."""
    body = await read_json(request)
    message, given = parse_generate(body)
    if isinstance(body, dict) and body.get("stream"):
        _not_streamed(given)
        return await _stream(request, message, given)
    return json_response(
        [await _generate(request, message, given)]
    )  # TGI's compat route answers a one-element list (its client reads [0])


async def info(request: web.Request) -> web.Response:
    i = await router_info(request.app[ROUTER])
    return json_response(
        {
            "model_id": i.model_id,
            "model_sha": None,
            "model_dtype": i.dtype,
            "model_device_type": i.device.split(":")[0],
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": i.max_concurrent_requests,
            "max_best_of": MAX_BEST_OF,
            "max_stop_sequences": i.max_stop_sequences,
            "max_input_tokens": i.max_input_tokens,
            "max_total_tokens": i.max_total_tokens,
            "validation_workers": 1,
            "max_client_batch_size": 1,
            "router": "switchyard",
            "version": i.version,
            "sha": None,
            "docker_label": None,
        }
    )
