"""``POST /v1/completions``: OpenAI's legacy text completions (prompt strings or token ids)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from facade import params, sse
from facade.choices import StreamSet, best_of, generate_all
from facade.errors import invalid
from facade.json_body import json_response, read_json
from facade.openai_chat import FINISH_REASON, SYSTEM_FINGERPRINT, usage_body
from facade.request_models import UINT32_MAX, fields_of, validate_body
from facade.request_models import CompletionRequest as CompletionBody
from facade.state import ROUTER
from protos import router_pb2 as pb

_FIELDS = fields_of(CompletionBody)


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None
    prompts: list[str | list[int]]
    requests: list[pb.GenerateRequest]  # prompt-major: prompt k, candidate i -> k * best_of + i
    n: int
    #: Candidates per prompt (n unless best_of asks for more): the n most likely are returned.
    best_of: int
    #: vLLM's prompt_logprobs: alternatives per prompt token (None: off).
    prompt_logprobs: int | None = None


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One prompt per text or token-id list (the model's types; what they cannot say is checked here)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and params.token_ids(prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if prompt and all(isinstance(p, list) and p and params.token_ids(p) for p in prompt):
        return [list(p) for p in prompt]  # type: ignore[arg-type]
    raise invalid(
        f"'prompt' must be a string, an array of strings, or token ids (integers in 0..{UINT32_MAX})", "prompt"
    )


def parse_completion(body: Any) -> CompletionRequest:
    if isinstance(body, dict):  # unknown fields are named before anything else
        params.check_fields(body, _FIELDS)
    req = validate_body(CompletionBody, body)
    prompts = _prompts(req.prompt)
    p = params.parameters(req, req.max_tokens)
    if req.logprobs is not None:
        if req.logprobs > 5:
            raise invalid("'logprobs' must be between 0 and 5", "logprobs")
        p.logprobs, p.top_n_tokens = True, req.logprobs
        if req.echo:  # the echoed prompt's tokens come with their logprobs, as OpenAI's legacy API gives them
            p.prompt_logprobs = True
    params.ask_prompt_logprobs(p, req.prompt_logprobs, bool(req.stream))
    n = req.n or 1
    candidates = params.best_of_count(req.best_of, n, bool(req.stream))
    if len(prompts) * candidates > params.MAX_SEQUENCES:
        raise invalid(
            f"{len(prompts)} prompts x {candidates} choices asks for {len(prompts) * candidates} sequences; at most "
            f"{params.MAX_SEQUENCES} per request",
            "prompt",
        )
    requests = []
    for prompt in prompts:
        for choice in params.per_choice(p, candidates):
            model = req.model or ""  # an adapter's name selects it (router.proto, GenerateRequest.model)
            if isinstance(prompt, str):
                requests.append(pb.GenerateRequest(prompt=prompt, parameters=choice, model=model))
            else:
                requests.append(pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=prompt), parameters=choice, model=model))
    stream = bool(req.stream)
    return CompletionRequest(
        req.model or "tgi", stream, params.include_usage(req), bool(req.echo), req.logprobs, prompts, requests, n,
        candidates, req.prompt_logprobs,
    )  # fmt: skip


def _logprobs(tokens: Any, offset: int, alternatives: int, prompt: Any = ()) -> dict[str, Any]:
    """OpenAI's legacy logprobs object; ``prompt``: the echoed prompt's tokens, ahead of the output's
    (the first one's logprob and alternatives null, as nothing precedes it)."""
    every = [*prompt, *tokens]
    text_offset, position = [], offset - sum(len(t.text) for t in prompt)
    for t in every:
        text_offset.append(position)
        position += len(t.text)
    first = [None] if prompt else []
    rest = every[1:] if prompt else every
    return {
        "tokens": [t.text for t in every],
        "token_logprobs": first + [t.logprob for t in rest],
        "top_logprobs": first + [{a.text: a.logprob for a in t.top[:alternatives]} for t in rest],
        "text_offset": text_offset,
    }


class CompletionResponder:
    def __init__(self, parsed: CompletionRequest, prompt_texts: list[str]):
        self.parsed = parsed
        self.prompt_texts = prompt_texts
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.parsed.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def _prefix(self, index: int) -> str:
        return self.prompt_texts[index // self.parsed.n] if self.parsed.echo else ""

    def choice(
        self, index: int, text: str, tokens: Any, finish: str | None, first: bool, prompt: Any = ()
    ) -> dict[str, Any]:
        """``prompt``: the prompt's scored tokens (the answer's ``prompt_tokens``), on its first part."""
        prefix = self._prefix(index) if first else ""
        logprobs = None
        if self.parsed.logprobs is not None:
            echoed = prompt if prefix else ()
            logprobs = _logprobs(tokens, len(prefix), self.parsed.logprobs, echoed)
        choice = {"index": index, "text": prefix + text, "logprobs": logprobs, "finish_reason": finish}
        if self.parsed.prompt_logprobs is not None and first:
            choice["prompt_logprobs"] = params.vllm_prompt_logprobs(prompt, self.parsed.prompt_logprobs)
        return choice

    def completion(self, answers: list[pb.GenerateResponse], unchosen: int = 0) -> dict[str, Any]:
        """``unchosen``: completion tokens of best_of candidates not returned (they count in usage)."""
        body = self._envelope()
        body["choices"] = [
            self.choice(i, a.text, a.tokens, FINISH_REASON[a.finish_reason], True, a.prompt_tokens)
            for i, a in enumerate(answers)
        ]
        body["usage"] = self.usage([a.usage for a in answers], unchosen)
        return body

    def usage(self, usages: list[pb.Usage], unchosen: int = 0) -> dict[str, Any]:
        """Usage over choices in request order: each prompt counted once, every completion counted
        (best_of's candidates too, as OpenAI bills them)."""
        firsts = [usages[k * self.parsed.n] for k in range(len(self.parsed.prompts))]
        completion = sum(u.completion_tokens for u in usages) + unchosen
        return usage_body(sum(u.prompt_tokens for u in firsts), completion, sum(u.cached_tokens for u in firsts))

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope()
        body["choices"] = [choice]
        return body


async def _prompt_texts(request: web.Request, parsed: CompletionRequest) -> list[str]:
    if not parsed.echo:
        return []
    router = request.app[ROUTER]
    texts = []
    for prompt in parsed.prompts:
        if isinstance(prompt, str):
            texts.append(prompt)
        else:
            texts.append((await router.Detokenize(pb.DetokenizeRequest(ids=prompt))).text)
    return texts


async def _best_of_completion(router: Any, parsed: CompletionRequest, responder: CompletionResponder) -> dict:
    """best_of > n: each prompt's candidates run sharing its KV blocks; its n most likely are the choices."""
    groups = [parsed.requests[k * parsed.best_of : (k + 1) * parsed.best_of] for k in range(len(parsed.prompts))]
    ranked = await asyncio.gather(*(best_of(router, group) for group in groups))
    chosen = [answer for answers in ranked for _, answer in answers[: parsed.n]]
    unchosen = sum(answer.usage.completion_tokens for answers in ranked for _, answer in answers[parsed.n :])
    return responder.completion(chosen, unchosen)


async def completions(request: web.Request) -> web.StreamResponse:
    parsed = parse_completion(await read_json(request))
    router = request.app[ROUTER]
    responder = CompletionResponder(parsed, await _prompt_texts(request, parsed))
    if parsed.best_of > parsed.n:
        return json_response(await _best_of_completion(router, parsed, responder))
    if not parsed.stream:
        return json_response(responder.completion(await generate_all(router, parsed.requests)))
    streams = StreamSet(router, parsed.requests)
    await streams.start()
    response = await sse.open_stream(request)
    usages: dict[int, pb.Usage] = {}
    started: set[int] = set()
    try:
        async for i, m in streams.messages():
            finish = FINISH_REASON[m.finish_reason] if m.finish_reason else None
            choice = responder.choice(i, m.text, m.tokens, finish, i not in started, m.prompt_tokens)
            await sse.send(response, responder.chunk(choice))
            started.add(i)
            if finish:
                usages[i] = m.usage
        if parsed.include_usage and len(usages) == len(parsed.requests):
            body = responder._envelope()
            body["choices"] = []
            body["usage"] = responder.usage([usages[i] for i in sorted(usages)])
            await sse.send(response, body)
    finally:
        streams.close()
    await sse.send_done(response)
    return response
