"""Turning a public GenerateRequest into a router Request, or a clear error."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from typing import Any

from common.chat_roles import ROLES
from common.sampling_fields import BY_NAME, SAMPLING_FIELDS
from common.sampling_params import SamplingParams
from protos import router_pb2 as pb
from router.adapters import AdapterRegistry
from router.config import Limits
from router.embeddings import EmbeddingConfig
from router.errors import NoChatTemplate, ValidationError
from router.generation_defaults import GenerationDefaults
from router.grammar import json_object_grammar, json_schema_grammar, regex_grammar
from router.reasoning import ReasoningFormat, ReasoningWatch, after_thinking, starts_inside
from router.request import Request
from router.stopping import StopCondition, TextStream
from router.tokenization import TEMPLATE_CALL_ARGUMENTS, Tokenizer
from router.tools import HERMES, CallWatch, ToolCallFormat, calls_possible, template_calls, template_tools, tool_grammar


@dataclass(frozen=True)
class Validator:
    tokenizer: Tokenizer
    limits: Limits
    max_stop_sequences: int
    max_top_n_tokens: int = 20
    #: Width of the model's logits: token ids must be below it.
    vocab_size: int = 1 << 31
    #: Sampling values used when a request leaves them out.
    defaults: GenerationDefaults = dataclasses.field(default_factory=GenerationDefaults)
    #: How this model writes tool calls (router.tools).
    tool_format: ToolCallFormat = HERMES
    #: How this model writes its thinking (router.reasoning); None: it does not.
    reasoning: ReasoningFormat | None = None
    #: How this model embeds (router.embeddings).
    embedding: EmbeddingConfig = dataclasses.field(default_factory=EmbeddingConfig)
    #: The LoRA adapters served (router.adapters), and the names of the base model itself.
    adapters: AdapterRegistry = dataclasses.field(default_factory=AdapterRegistry)
    model_names: tuple[str, ...] = ()

    def prompt_ids(self, request: pb.GenerateRequest | pb.TokenizeRequest) -> tuple[list[int], str]:
        """Token ids and text of the prompt (a rendered chat or raw text)."""
        kind = request.WhichOneof("input")
        if kind == "chat":
            text = self._render(request.chat)
            return self.tokenizer.encode(text, add_special_tokens=False), text
        if kind == "prompt" and request.prompt:
            return self.tokenizer.encode(request.prompt, add_special_tokens=True), request.prompt
        if kind == "prompt_ids" and isinstance(request, pb.GenerateRequest) and request.prompt_ids.ids:
            ids = list(request.prompt_ids.ids)
            if max(ids) >= self.vocab_size:
                raise ValidationError(f"token ids must be below the vocabulary size {self.vocab_size}", "prompt")
            return ids, self.tokenizer.decode(ids, skip_special_tokens=False)
        raise ValidationError(
            "a request needs a non-empty chat or prompt", param="messages" if kind == "chat" else "prompt"
        )

    def _render(self, chat: pb.Chat) -> str:
        if not chat.messages:
            raise ValidationError("messages must hold at least one message", param="messages")
        messages = []
        for i, m in enumerate(chat.messages):
            if m.role not in ROLES:
                raise ValidationError(
                    f"messages[{i}].role must be one of {sorted(ROLES)}, got {m.role!r}",
                    param=f"messages[{i}].role",
                )
            messages.append(_template_message(m))
        kwargs = self._template_kwargs(chat.template_kwargs)
        try:
            return self.tokenizer.render_chat(messages, template_tools(chat), self.tool_format, kwargs)
        except NoChatTemplate as exc:
            raise ValidationError(str(exc), param="messages") from exc
        except Exception as exc:  # templates raise their own errors (e.g. role order)
            raise ValidationError(f"the chat template rejected these messages: {exc}", param="messages") from exc

    @staticmethod
    def _template_kwargs(text: str) -> dict[str, Any]:
        """The chat's extra template variables: a JSON object whose keys are not arguments of
        the template call itself (those are the router's to set)."""
        if not text:
            return {}
        try:
            kwargs = json.loads(text)
        except ValueError:
            kwargs = None
        if not isinstance(kwargs, dict):
            raise ValidationError("chat_template_kwargs must be a JSON object", "chat_template_kwargs")
        reserved = sorted(set(kwargs) & TEMPLATE_CALL_ARGUMENTS)
        if reserved:
            raise ValidationError(
                f"chat_template_kwargs may not set {reserved}: the server sets them", "chat_template_kwargs"
            )
        return kwargs

    def request(self, request_id: int, message: pb.GenerateRequest) -> Request:
        # First: an unknown adapter is a 404 whatever else is wrong.
        adapter = self.adapters.resolve(message.adapter, message.model, self.model_names)
        ids, text = self.prompt_ids(message)
        if not ids:  # e.g. only control characters, which the tokenizer drops
            param = "messages" if message.WhichOneof("input") == "chat" else "prompt"
            raise ValidationError("the prompt is empty once tokenized: it has no text the model can read", param)
        p = message.parameters
        if p.HasField("truncate"):
            ids = self._truncated(ids, p.truncate)
        sampling = self._sampling(p)
        max_new = self._max_new_tokens(p, len(ids))
        stops = list(p.stop)
        if len(stops) > self.max_stop_sequences:
            raise ValidationError(f"at most {self.max_stop_sequences} stop sequences are allowed", param="stop")
        if any(not s for s in stops):
            raise ValidationError("stop sequences must not be empty", param="stop")
        condition = StopCondition(self.tokenizer.eos_token_ids, max_new, tuple(stops), p.ignore_eos)
        grammar, may_call = self._grammar(message)
        # A chat's thinking is told apart from its answer (a raw prompt's output is left as it is).
        thinking = self.reasoning if message.WhichOneof("input") == "chat" else None
        inside = thinking is not None and starts_inside(thinking, text)
        if grammar and thinking is not None:
            grammar = after_thinking(grammar, thinking, inside)
        if grammar:
            sampling = dataclasses.replace(sampling, grammar=grammar)
        # A trigger or think tag that is a special token ([TOOL_CALLS]) must stay in the text to be found.
        marks = ([self.tool_format.trigger] if may_call else []) + ([thinking.end] if thinking else [])
        keep_special = any(self.tokenizer.is_special_text(mark) for mark in marks)
        stream = TextStream(self.tokenizer.detokenizer(ids, keep_special), condition)
        if may_call:
            stream.calls = CallWatch(self.tool_format)
        if thinking is not None:
            stream.reasoning = ReasoningWatch(thinking, inside)
        return Request(
            id=request_id, prompt_ids=ids, sampling=sampling, stream=stream, want_logprobs=p.logprobs,
            priority=p.priority, prompt_logprobs=p.prompt_logprobs, adapter=adapter,
            # Prompt logprobs need every prompt position computed: the cache would skip some.
            use_prefix_cache=not p.prompt_logprobs,
        )  # fmt: skip

    def embed_request(self, request_id: int, message: pb.EmbedRequest) -> Request:
        """An embedding request: its input tokens, pooled by the model's pooling, nothing generated."""
        kind = message.WhichOneof("input")
        if kind == "ids" and message.ids.ids:
            ids = list(message.ids.ids)
            if max(ids) >= self.vocab_size:
                raise ValidationError(f"token ids must be below the vocabulary size {self.vocab_size}", "input")
        elif kind == "text" and message.text:
            ids = self.tokenizer.encode(message.text, add_special_tokens=True)
        else:
            raise ValidationError("the input to embed must be a non-empty text or list of token ids", "input")
        if not ids:
            raise ValidationError("the input is empty once tokenized: it has no text the model can read", "input")
        if message.HasField("truncate"):
            ids = self._truncated(ids, message.truncate)
        if len(ids) > self.limits.max_input_tokens:
            raise ValidationError(
                f"This model's maximum input length is {self.limits.max_input_tokens} tokens. However, you "
                f"requested {len(ids)} tokens in the input. Please reduce the length of the input.",
                "input",
            )
        self.embedding.check_dimensions(message.dimensions)
        condition = StopCondition(frozenset(), 1, (), ignore_eos=True)  # nothing is generated
        stream = TextStream(self.tokenizer.detokenizer(ids), condition)
        sampling = SamplingParams(seed=0, eos_token_ids=tuple(sorted(self.tokenizer.eos_token_ids)))
        pooling = self.embedding.shard_pooling
        return Request(
            id=request_id, prompt_ids=ids, sampling=sampling, stream=stream, priority=message.priority,
            pooling=pooling,
            # Mean and first-token pooling read every position: the cache would skip some.
            use_prefix_cache=self.embedding.pooling == "last",
        )  # fmt: skip

    def _truncated(self, ids: list[int], keep: int) -> list[int]:
        """The last ``keep`` tokens (0: the last MAX_INPUT_TOKENS), as TGI's truncate."""
        most = self.limits.max_input_tokens
        if keep > most:
            raise ValidationError(f"truncate must be at most the maximum input length {most}, got {keep}", "truncate")
        return ids[-(keep or most) :]

    def _grammar(self, message: pb.GenerateRequest) -> tuple[str, bool]:
        """The output constraint (EBNF, or empty) and whether the answer may be a tool call."""
        fmt = message.parameters.response_format
        chat = message.chat if message.WhichOneof("input") == "chat" else None
        if calls_possible(chat) and fmt.type != pb.RESPONSE_FORMAT_TYPE_TEXT:
            raise ValidationError("response_format cannot be combined with tool calls", param="response_format")
        if chat is not None and calls_possible(chat):
            return tool_grammar(self.tool_format, chat), True
        if fmt.type == pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
            return json_object_grammar(), False
        if fmt.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
            return json_schema_grammar(fmt.value), False
        if fmt.type == pb.RESPONSE_FORMAT_TYPE_REGEX:
            return regex_grammar(fmt.value), False
        return "", False

    def _sampling(self, p: pb.GenerationParameters) -> SamplingParams:
        d = self.defaults
        sampling = SamplingParams(
            temperature=p.temperature if p.HasField("temperature") else d.temperature,
            top_p=p.top_p if p.HasField("top_p") else d.top_p,
            # A client that picks its own temperature gets no hidden top_k.
            top_k=p.top_k or (0 if p.HasField("temperature") else d.top_k),
            seed=p.seed if p.HasField("seed") else random.getrandbits(63),
            min_p=p.min_p,
            typical_p=p.typical_p if p.HasField("typical_p") else BY_NAME["typical_p"].neutral,
            repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else d.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            logit_bias=tuple(sorted(p.logit_bias.items())),
            top_n_tokens=p.top_n_tokens,
            min_tokens=0 if p.ignore_eos else p.min_new_tokens,
            eos_token_ids=tuple(sorted(self.tokenizer.eos_token_ids)),
        )
        self._check_sampling(sampling)
        return sampling

    def _check_sampling(self, sampling: SamplingParams) -> None:
        """The ranges of ``SAMPLING_FIELDS``, and what depends on this router: the vocabulary and
        MAX_TOP_N_TOKENS."""
        for spec in SAMPLING_FIELDS:
            if spec.kind is float and spec.name != "logit_bias":
                why = spec.problem(getattr(sampling, spec.name))
                if why is not None:
                    raise ValidationError(why, param=spec.name)
        if sampling.top_n_tokens > self.max_top_n_tokens:
            raise ValidationError(f"top_logprobs must be at most {self.max_top_n_tokens}", param="top_logprobs")
        bias = BY_NAME["logit_bias"]
        for token, value in sampling.logit_bias:
            if token >= self.vocab_size:
                raise ValidationError(f"logit_bias token id {token} is not in the vocabulary", param="logit_bias")
            if (why := bias.problem(value)) is not None:
                raise ValidationError(why, param="logit_bias")

    def _max_new_tokens(self, p: pb.GenerationParameters, prompt_len: int) -> int:
        limits = self.limits
        if prompt_len > limits.max_input_tokens:
            raise ValidationError(
                f"This model's maximum input length is {limits.max_input_tokens} tokens. "
                f"However, your messages resulted in {prompt_len} tokens. Please reduce the length of the messages.",
                param="messages",
            )
        room = limits.max_total_tokens - prompt_len
        if not p.HasField("max_new_tokens"):
            return room
        if p.max_new_tokens < 1:
            raise ValidationError("max_new_tokens must be at least 1", param="max_new_tokens")
        if p.max_new_tokens > room:
            raise ValidationError(
                f"This model's maximum context length is {limits.max_total_tokens} tokens. However, you requested "
                f"{prompt_len + p.max_new_tokens} tokens ({prompt_len} in the messages, {p.max_new_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages",
            )
        return p.max_new_tokens


def _template_message(m: pb.ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it (tool calls with parsed arguments, as transformers documents)."""
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        message["name"] = m.name
    if m.tool_calls:
        message["tool_calls"] = template_calls(list(m.tool_calls))
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return message
