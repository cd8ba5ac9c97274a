"""Paged attention over packed batches, plugged into transformers' model classes.

The model runs on one flat row of tokens (``[1, tokens]``): prefill chunks and
decode tokens of every sequence of the step, with their own positions. Our
function is registered in transformers' ``AttentionInterface``; each attention
layer hands it the step's new q/k/v, and it

1. writes the new keys/values into their KV slots, then
2. attends every query to its own sequence's cached context, through a backend
   chosen by device (``step``: the metadata and the backend interface;
   ``gathered_sdpa``: portable, any device; ``cpu_paged``: the C decode kernel).
"""

from __future__ import annotations

import logging

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from shard.numerics.attention import cpu_paged, gathered_sdpa
from shard.numerics.attention.step import AttentionGroup, GroupAttention, PagedStep, SequenceSpan, build_step

__all__ = ["ATTENTION_NAME", "AttentionGroup", "Backends", "PagedStep", "SequenceSpan", "build_step", "register"]

log = logging.getLogger(__name__)

ATTENTION_NAME = "switchyard_paged"
BACKEND_NAMES = ("auto", "sdpa", "cpu-paged")

#: Forward kwargs that change the attention math and that the backends do not implement.
UNSUPPORTED = ("softcap", "s_aux")


class Backends:
    """The decode and prefill backends of one engine.

    With the CPU kernel (``auto`` on a CPU, or ``cpu-paged``) both are the kernel:
    one numerical path for every query. ``sdpa`` (and CUDA, for now) gathers the
    context and runs torch SDPA, whose reduction order depends on the query length.
    """

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype):
        if name not in BACKEND_NAMES:
            raise ValueError(f"ATTENTION_BACKEND must be one of {BACKEND_NAMES}, got {name!r}")
        self.prefill: GroupAttention = gathered_sdpa.attend
        self.decode: GroupAttention = gathered_sdpa.attend
        if name in ("auto", "cpu-paged"):
            kernel = cpu_paged.backend(device, dtype)
            if kernel is not None:
                self.decode = self.prefill = kernel
            elif name == "cpu-paged":
                raise ValueError(f"ATTENTION_BACKEND=cpu-paged needs a CPU, a C compiler and {dtype} support")
        self.name = "cpu-paged" if self.decode is not gathered_sdpa.attend else "sdpa"
        log.info("attention: %s for decode and prefill", self.name)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged_step: PagedStep | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The transformers attention function.

    query: [1, heads, tokens, head_dim]; key/value: [1, kv_heads, tokens, head_dim].
    """
    if paged_step is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention needs the paged_step forward kwarg")
    unsupported = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(f"{ATTENTION_NAME} attention does not implement {unsupported}")
    cache, layer = paged_step.cache, int(module.layer_idx)  # type: ignore[arg-type]
    cache.write(layer, paged_step.slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    q = query[0].transpose(0, 1)  # [tokens, heads, head_dim]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if len(paged_step.groups) == 1 and paged_step.groups[0].packed_rows.shape[0] == q.shape[0]:
        group = paged_step.groups[0]  # the common case: one group covering the step in order
        out = paged_step.attention_for(group)(q, cache, layer, group, scale, sliding_window)
        return out.unsqueeze(0), None
    out = torch.empty_like(q)
    for group in paged_step.groups:
        out[group.packed_rows] = paged_step.attention_for(group)(q, cache, layer, group, scale, sliding_window)
    return out.unsqueeze(0), None  # [1, tokens, heads, head_dim]


def _no_mask(*args, **kwargs) -> None:
    # Masks come from PagedStep; transformers' own mask would be wasted work.
    return None


def register() -> str:
    """Registers the attention function and its (empty) mask; returns the implementation name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    return ATTENTION_NAME
