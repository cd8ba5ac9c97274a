"""The model's forward without transformers' generic wrapper, where it is the same computation.

For families whose model forward is exactly embedding -> rotary tables -> decoder layers ->
final norm -> head on the kept rows (Llama, Mistral, Qwen2: no embedding scale, no logit
soft-capping), with every decoder layer ours (``FastDecoderLayer``), the engine calls those
very modules on the very tensors itself: the same bits, without what transformers adds each
step that our layers never read (the causal mask and its packed-sequence detection, output
capturing, keyword plumbing): docs/performance.md, "Fewer calls per layer and per step".

Being ours, it also runs the layer stack as one C call where every layer has its one-call
path (``shard.numerics.native_layer.NativeStack``), 4-5% of a one-sequence decode step. The final norm
runs on the rows the head reads only (a norm is per row: the same bits as norming every row
and keeping some; it stays transformers' own, whose reduction order the logits' bits follow).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from shard.numerics.attention.step import PagedStep
from shard.numerics.decoder_layers import FastDecoderLayer
from shard.numerics.native_layer import NativeStack, NativeStep

#: Causal LMs whose model forward is the plain chain above (transformers' own code, checked).
PLAIN_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


class DirectForward:
    def __init__(self, model: Any):
        # transformers' modules, typed loosely as transformers' own forward uses them.
        self.inner: Any = model.model
        self.layers: list[Any] = list(self.inner.layers[: model.config.num_hidden_layers])
        self.head: Any = model.lm_head
        #: The stack as one call, built at the first step (the layers describe themselves then).
        self._stack: NativeStack | Literal[False] | None = None

    @classmethod
    def of(cls, model: nn.Module) -> DirectForward | None:
        """The direct path for ``model``, or None where transformers' forward must run."""
        inner = getattr(model, "model", None)
        if type(model).__name__ not in PLAIN_ARCHITECTURES or inner is None or not hasattr(model, "lm_head"):
            return None
        if not all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm")):
            return None
        layers = list(inner.layers)
        if not layers or not all(isinstance(layer, FastDecoderLayer) for layer in layers):
            return None  # e.g. tensor-parallel layers: transformers' forward drives them
        return cls(model)

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, step: PagedStep, keep: torch.Tensor
    ) -> torch.Tensor:
        """Logits [1, len(keep), vocab] in the model's dtype, as ``model(...).logits``."""
        h = self.inner.embed_tokens(input_ids)
        position_embeddings = self.inner.rotary_emb(h, position_ids)
        h = self._layers(h, position_embeddings, step)
        return self.head(self.inner.norm(h[:, keep, :]))

    def with_hidden(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        step: PagedStep,
        keep: torch.Tensor,
        hidden_rows: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits as ``__call__``, and the final hidden states (after the final norm) of
        ``hidden_rows``, [len(hidden_rows), hidden], for embeddings (None when not asked)."""
        h = self.inner.embed_tokens(input_ids)
        position_embeddings = self.inner.rotary_emb(h, position_ids)
        h = self._layers(h, position_embeddings, step)
        logits = self.head(self.inner.norm(h[:, keep, :]))
        hidden = self.inner.norm(h[:, hidden_rows, :])[0] if hidden_rows is not None else None
        return logits, hidden

    def _layers(self, h: torch.Tensor, position_embeddings: Any, step: PagedStep) -> torch.Tensor:
        if self._stack is None:
            self._stack = NativeStack.of([layer.native_layer() for layer in self.layers]) or False
        x = h[0]  # [tokens, hidden]: the engine packs a step into one row
        native = self._stack and NativeStep.of(step, x, position_embeddings, self._stack.first)
        if native:
            return self._stack.forward(native, x).unsqueeze(0)  # type: ignore[union-attr]
        for layer in self.layers:
            h = layer(h, position_embeddings=position_embeddings, paged_step=step)
        return h
