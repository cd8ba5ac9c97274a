"""The request bodies the facade accepts, as pydantic models: one source for validation and docs.

Each handler validates its body against its model first (``validate_body``: a
wrong JSON type is a 400 naming the field, as ``messages[0].content``) and reads
the typed model it returns; ``/openapi.json`` is generated from the same models,
so the document cannot drift from what is accepted: the accepted field names
*are* the models' fields. The parsers in openai_chat, openai_completions,
responses_request and tgi turn the validated model into router calls and check
what types cannot say (which roles may have empty content, neutral-only
parameters, ...). Sampling ranges come from ``common.sampling_fields``, the table
the router checks gRPC callers against too.

Models allow extra fields so that the parsers can answer unknown ones in
OpenAI's wording ("Unrecognized request argument supplied") and unsupported
ones as "not supported yet". Responses are built as dicts and written with
orjson: pydantic stays off the output path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from common.chat_roles import Role
from common.sampling_fields import BY_NAME
from facade.errors import invalid

#: Largest value of the protobuf uint32 fields counts and token ids travel in.
UINT32_MAX = (1 << 32) - 1
#: Most choices (n) one request may ask for, as OpenAI.
MAX_N = 128


def sampling_field(name: str, description: str | None = None) -> Any:
    """An optional field with the range ``common.sampling_fields`` declares for ``name`` (integers
    also within the uint32 they travel in)."""
    spec = BY_NAME[name]
    bounds = spec.pydantic_bounds()
    if spec.kind is int and spec.high is None:
        bounds["le"] = UINT32_MAX
    return Field(None, description=description, **bounds)


def count_field(low: int, description: str | None = None) -> Any:
    """An optional count: at least ``low``, at most what a uint32 holds."""
    return Field(None, ge=low, le=UINT32_MAX, description=description)


class RequestModel(BaseModel):
    # strict: JSON true is not a number and "1" is not an integer.
    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)


# --- shared parts -------------------------------------------------------------------


class StreamOptions(RequestModel):
    include_usage: bool | None = None


class ContentPart(RequestModel):
    """A part of a message's content: only ``text`` parts are read."""

    type: str
    text: str | None = None


class CalledFunction(RequestModel):
    name: str
    arguments: str | dict[str, Any] = Field(description="JSON text (or an object) of the arguments")


class ToolCall(RequestModel):
    """A call the assistant made earlier in the conversation."""

    id: str | None = None
    type: Literal["function"] | None = None
    function: CalledFunction


class ChatMessage(RequestModel):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(RequestModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments")
    strict: bool | None = None


class ChatTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaSpec(RequestModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


Stop = str | list[str] | None
Bias = Annotated[float, Field(**BY_NAME["logit_bias"].pydantic_bounds())]


class SamplingFields(RequestModel):
    """Fields chat and text completions share (OpenAI's, then other servers' extras)."""

    model: str | None = Field(None, description='the served model\'s id, or "tgi"')
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = count_field(1)
    temperature: float | None = sampling_field("temperature")
    top_p: float | None = sampling_field("top_p")
    seed: int | None = None
    stop: Stop = Field(None, description="up to MAX_STOP_SEQUENCES strings")
    n: int | None = Field(None, ge=1, le=MAX_N)
    frequency_penalty: float | None = sampling_field("frequency_penalty")
    presence_penalty: float | None = sampling_field("presence_penalty")
    logit_bias: dict[str, Bias] | None = Field(None, description="token id -> bias in [-100, 100]")
    top_k: int | None = Field(None, ge=-1, le=UINT32_MAX, description="-1 or 0: off")
    min_p: float | None = sampling_field("min_p")
    repetition_penalty: float | None = sampling_field("repetition_penalty")
    typical_p: float | None = sampling_field("typical_p")
    ignore_eos: bool | None = None
    min_tokens: int | None = sampling_field("min_tokens")
    best_of: int | None = Field(
        None, ge=1, le=UINT32_MAX, description="completions: candidates per prompt, the n most likely returned"
    )
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, le=UINT32_MAX, description="keep the last N prompt tokens (vLLM's); -1: the last MAX_INPUT_TOKENS"
    )
    priority: int | None = Field(
        None, ge=-(1 << 31), lt=1 << 31, description="lower is served sooner under SCHEDULING_POLICY=priority"
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20, description="vLLM's: each prompt token's logprob, with this many alternatives"
    )
    # Informational: accepted, change nothing.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = count_field(1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | str | None = Field(
        None, description="none, auto, required, a named function, or a bare function name (as TGI takes)"
    )
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='extra chat template variables (vLLM\'s), e.g. {"enable_thinking": false}'
    )


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="text(s) or token ids")
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=20)


# --- the Responses API -------------------------------------------------------------


class ResponsesTool(RequestModel):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextOptions(RequestModel):
    format: dict[str, Any] | None = Field(None, description='{"type": "text" | "json_object" | "json_schema", ...}')


class CreateResponse(RequestModel):
    model: str | None = None
    input: str | list[dict[str, Any]] = Field(description="text, or message / function-call-output items")
    instructions: str | None = None
    max_output_tokens: int | None = count_field(1)
    temperature: float | None = sampling_field("temperature")
    top_p: float | None = sampling_field("top_p")
    stream: bool | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    previous_response_id: str | None = Field(None, description="a response kept in memory (RESPONSES_STORE_SIZE)")
    store: bool | None = None
    metadata: dict[str, str] | None = None
    seed: int | None = None
    # Informational: accepted, change nothing (echoed where the Response object has them).
    user: str | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    stream_options: dict[str, Any] | None = None
    # Accepted at their neutral value only (responses_request.NEUTRAL).
    truncation: str | None = Field(None, description='neutral only: "disabled"')
    reasoning: dict[str, Any] | None = Field(None, description="neutral only: {}")
    include: list[Any] | None = Field(None, description="neutral only: []")
    background: bool | None = Field(None, description="neutral only: false")
    top_logprobs: int | None = Field(None, description="neutral only: 0")
    max_tool_calls: int | None = Field(None, description="neutral only: null")
    prompt: dict[str, Any] | None = Field(None, description="neutral only: null")
    conversation: str | dict[str, Any] | None = Field(None, description="neutral only: null")


# --- embeddings ------------------------------------------------------------------------


class EmbeddingRequest(RequestModel):
    input: str | list[str] | list[int] | list[list[int]] = Field(description="text(s) or token ids, not empty")
    model: str | None = Field(None, description='the served model\'s id, or "tgi"')
    encoding_format: Literal["float", "base64"] | None = Field(None, description="base64: little-endian float32")
    dimensions: int | None = Field(None, ge=1, le=UINT32_MAX, description="Matryoshka models only")
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=UINT32_MAX, description="keep the last N tokens")
    normalize: bool | None = Field(None, description="scale to unit length; default: the model's")
    priority: int | None = Field(None, ge=-(1 << 31), lt=1 << 31)


# --- TGI and vLLM routes ------------------------------------------------------------


class Grammar(RequestModel):
    type: Literal["json", "regex", "json_object", "json_schema", "text"]
    value: dict[str, Any] | str | None = None


class GenerateParameters(RequestModel):
    """TGI's parameters; those marked neutral-only are accepted at their neutral value."""

    best_of: int | None = Field(None, ge=1, le=UINT32_MAX, description="candidates; the most likely returned")
    decoder_input_details: bool | None = Field(None, description="details.prefill: each prompt token's logprob")
    details: bool | None = None
    do_sample: bool | None = None
    frequency_penalty: float | None = sampling_field("frequency_penalty")
    max_new_tokens: int | None = count_field(1)
    repetition_penalty: float | None = sampling_field("repetition_penalty")
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] | None = None
    temperature: float | None = sampling_field("temperature")
    top_k: int | None = sampling_field("top_k")
    top_n_tokens: int | None = sampling_field("top_n_tokens", "up to MAX_TOP_N_TOKENS")
    top_p: float | None = sampling_field("top_p")
    typical_p: float | None = sampling_field("typical_p")
    truncate: int | None = Field(None, ge=1, le=UINT32_MAX, description="keep the last N prompt tokens")
    watermark: bool | None = Field(None, description="neutral only: false")
    grammar: Grammar | None = None
    adapter_id: str | None = Field(None, description="a LoRA adapter's name (LORA_ADAPTERS, /v1/load_lora_adapter)")


class GenerateRequest(RequestModel):
    inputs: str = Field(description="the prompt, not empty")
    parameters: GenerateParameters | None = None
    stream: bool | None = None


class TokenizeRequest(RequestModel):
    """vLLM's shape (``prompt`` or ``messages``), or TGI's (``inputs``)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    inputs: str | None = None
    add_special_tokens: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="as in chat completions")


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


ModelT = TypeVar("ModelT", bound=RequestModel)


def fields_of(model: type[BaseModel]) -> frozenset[str]:
    """The JSON names a model accepts."""
    return frozenset(f.alias or name for name, f in model.model_fields.items())


def validate_body(model: type[ModelT], body: Any) -> ModelT:
    """``body`` as ``model``, typed; a 400 naming the first wrong field."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        param, message = _first_problem(exc)
        raise invalid(f"'{param}': {message}" if param else message, param or None) from None


def _first_problem(exc: pydantic.ValidationError) -> tuple[str, str]:
    """The field path (``messages[0].content``) and message of the deepest error.

    For a union pydantic reports one error per member, tagged with the member's
    type (``str``, ``list[ContentPart]``): the tags are dropped from the path, and
    the members' messages joined when none went deeper.
    """
    located = [(_param(e["loc"]), e["msg"], len(e["loc"])) for e in exc.errors(include_url=False)]
    first_param = located[0][0]
    same_field = [x for x in located if x[0].startswith(first_param)]
    deepest = max(same_field, key=lambda x: len(x[0]))
    if deepest[0] != first_param:
        return deepest[0], deepest[1]
    messages = dict.fromkeys(m for p, m, _ in same_field if p == first_param)
    return first_param, " or ".join(messages)


def _param(loc: tuple[int | str, ...]) -> str:
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif _is_union_tag(item):
            continue
        else:
            path += f".{item}" if path else item
    return path


def _is_union_tag(item: str) -> bool:
    return not item.isidentifier() or item[0].isupper() or item in ("str", "int", "float", "bool", "dict", "list")


class LoadLoraAdapterRequest(RequestModel):
    """vLLM's /v1/load_lora_adapter body."""

    lora_name: str = Field(description="the name clients select it by (model or adapter_id)")
    lora_path: str = Field(description="a PEFT adapter folder on the shards' disk")


class UnloadLoraAdapterRequest(RequestModel):
    """vLLM's /v1/unload_lora_adapter body."""

    lora_name: str
    lora_int_id: int | None = Field(None, description="accepted for vLLM's clients; the name decides")
