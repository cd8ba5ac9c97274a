"""One model's forward pass over a packed step, on a paged KV cache.

The engine's target model and the drafter's draft model (SPECULATIVE_METHOD=draft)
each have one: the same attention backends, the same direct forward where the model
allows it, logits only at the rows asked for.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import PreTrainedModel

from shard.numerics.attention import Backends, PagedStep, SequenceSpan, build_step
from shard.numerics.model_forward import DirectForward
from shard.numerics.sampling import LogitStats, logit_stats
from shard.runtime.kv_cache import PagedKVCache
from shard.runtime.pooling import captured_output, final_norm


class ModelRunner:
    def __init__(self, model: PreTrainedModel, device: torch.device, attention_backend: str = "auto"):
        self.model = model
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.attention = Backends(attention_backend, device, self.dtype)
        text_config = model.config.get_text_config()
        self.vocab_size = int(text_config.vocab_size)
        #: The model's forward without transformers' wrapper where that is the same (shard.numerics.model_forward);
        #: decided at the first step, once the decoder layers are in place.
        self._direct: DirectForward | Literal[False] | None = None

    def step(self, cache: PagedKVCache, spans: list[SequenceSpan]) -> PagedStep:
        """The attention metadata of one forward over ``spans``, packed in order."""
        return build_step(cache, spans, self.device, self.attention.decode, self.attention.prefill)

    def forward(
        self, ids: list[int], positions: list[int], step: PagedStep, sample_rows: list[int], hidden_rows: list[int]
    ) -> tuple[torch.Tensor, LogitStats, torch.Tensor | None]:
        """Float32 logits [len(sample_rows), vocab] of the sampling positions and their statistics,
        and the final hidden states [len(hidden_rows), hidden] of ``hidden_rows`` (None if none)."""
        logits, hidden = self.logits(ids, positions, step, sample_rows, hidden_rows)
        return logits, logit_stats(logits), hidden

    def logits(
        self, ids: list[int], positions: list[int], step: PagedStep, sample_rows: list[int], hidden_rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward`` without the statistics (a draft model's greedy guesses need none)."""
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)
        keep = torch.tensor(sample_rows or [len(ids) - 1], dtype=torch.long, device=self.device)
        pooled = torch.tensor(hidden_rows, dtype=torch.long, device=self.device) if hidden_rows else None
        if self._direct is None:
            self._direct = DirectForward.of(self.model) or False
        if self._direct:
            logits, hidden = self._direct.with_hidden(input_ids, position_ids, step, keep, pooled)
            return logits[0].float(), hidden
        inputs = dict(input_ids=input_ids, position_ids=position_ids, use_cache=False, paged_step=step,
                      logits_to_keep=keep)  # fmt: skip
        if pooled is None:
            return self.model(**inputs).logits[0].float(), None
        with captured_output(final_norm(self.model)) as normed:
            logits = self.model(**inputs).logits[0].float()
        return logits, normed[-1][0, pooled]
