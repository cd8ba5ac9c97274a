"""Drives an Engine the way the router does, for shard tests without gRPC."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

from common.model_source import ModelSource
from shard.loading.model_loader import load_model
from shard.numerics.invariant_linear import quantize_activations
from shard.numerics.sampling import SamplingParams
from shard.runtime.engine import Engine, NewRequest


@dataclass
class Tracked:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    computed: int = 0
    #: Tokens generated before a (simulated) preemption; they are the end of ``prompt``.
    sampled_before: int = 0
    #: The LoRA adapter it uses ("": the base model).
    adapter: str = ""


class Driver:
    BATCH = 7

    def __init__(self, engine: Engine):
        self.engine = engine
        self.next_block = 0
        self.live: dict[int, Tracked] = {}

    def _blocks(self, t: Tracked, tokens: int) -> list[int]:
        size = self.engine.block_size
        new = []
        while len(t.blocks) * size < tokens:
            t.blocks.append(self.next_block)
            new.append(self.next_block)
            self.next_block += 1
        return new

    def _requests(self, items: list[tuple[Tracked, int]]) -> list[NewRequest]:
        requests = []
        for t, chunk in items:
            self.live[t.request_id] = t
            self._blocks(t, t.computed + chunk)
            requests.append(
                NewRequest(
                    t.request_id,
                    t.prompt,
                    t.computed,
                    chunk,
                    list(t.blocks),
                    t.params,
                    t.sampled_before + len(t.tokens),
                    adapter=t.adapter,
                )
            )
        return requests

    def prefill(self, items: list[tuple[Tracked, int]]) -> None:
        """Prefills ``chunk`` prompt tokens of each tracked request."""
        result = self.engine.prefill(self.BATCH, self._requests(items))
        for t, chunk in items:
            t.computed += chunk
        self._record(result.generations)

    def decode(self, chunks: list[tuple[Tracked, int]] | None = None) -> None:
        """Advances every decoding request by a token, and computes ``chunks`` of prompts in the
        same step (a mixed step, as the router sends when prompts wait)."""
        extensions = {}
        for t in self.live.values():
            if t.tokens and t.computed == len(t.prompt) + len(t.tokens) - 1:
                extensions[t.request_id] = self._blocks(t, t.computed + 1)
        chunks = chunks or []
        result = self.engine.decode([self.BATCH], extensions, self._requests(chunks))
        chunked = {t.request_id for t, _ in chunks}
        for g in result.generations:
            if g.request_id not in chunked:
                self.live[g.request_id].computed += 1
        for t, chunk in chunks:
            t.computed += chunk
        self._record(result.generations)

    def finish(self, t: Tracked) -> None:
        del self.live[t.request_id]
        self.engine.filter(self.BATCH, list(self.live))

    def _record(self, generations) -> None:
        for g in generations:
            t = self.live[g.request_id]
            t.tokens.append(g.token_id)
            t.logprobs.append(g.logprob)


def make_engine(
    source: ModelSource,
    num_blocks_tokens: int = 8192,
    block_size: int = 4,
    attention_backend: str = "auto",
    max_batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    quantize: str = "none",
    int8_activations: bool = False,
    draft: ModelSource | None = None,
) -> Engine:
    """A warmed-up engine on ``source``, with ``draft`` as its draft model if given."""
    model = load_model(source, dtype, torch.device("cpu"), quantize=quantize)
    if int8_activations:  # before the first step, as the shard does: native layers read the layers then
        quantize_activations(model)
    engine = Engine(
        model,
        torch.device("cpu"),
        block_size,
        kv_fraction=0.5,
        attention_backend=attention_backend,
    )
    if draft is not None:
        engine.add_drafter(load_model(draft, dtype, torch.device("cpu"), quantize="auto"), attention_backend)
    engine.warmup(256, max_batch_size, num_blocks_tokens)
    return engine


def reference(source: ModelSource, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' own greedy generate, with its own attention: the oracle."""
    model = AutoModelForCausalLM.from_pretrained(
        source.path_or_id, **source.pretrained_kwargs(), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens, strict=True)]
    return tokens, logprobs
