"""Paged attention over packed batches, plugged into transformers' model classes.

The model runs on one flat row of tokens (``[1, tokens]``): prefill chunks and
decode tokens of every sequence of the step, with their own positions. Our
function is registered in transformers' ``AttentionInterface``; each attention
layer hands it the step's new q/k/v, and it

1. writes the new keys/values into their KV slots, then
2. attends every query to its own sequence's cached context, gathered by slot.

Sequences are grouped by query length (decode tokens vs prefill chunks) and
padded only inside a group, so a long prompt never pads the decode tokens.
The per-step metadata (``PagedStep``) is built once and reaches the layers
through the forward's kwargs, not through a global.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from shard.kv_cache import PagedKVCache

ATTENTION_NAME = "switchyard_paged"


@dataclass
class SequenceSpan:
    """One sequence's share of a step."""

    #: Tokens of this sequence computed in this step (queries).
    query_len: int
    #: Tokens whose KV is already cached, before this step.
    cached_len: int
    #: KV block table; covers at least ``cached_len + query_len`` positions.
    blocks: list[int]


@dataclass
class AttentionGroup:
    """Sequences of similar query length, padded to the group's maxima."""

    packed_rows: torch.Tensor  # [group_tokens] rows of the packed batch, in group order
    query_index: torch.Tensor  # [B, Qmax] packed row of each query (0 for padding)
    valid_rows: torch.Tensor  # [group_tokens] flat indices into [B * Qmax] of real queries
    block_table: torch.Tensor  # [B * n_blocks] KV block of each block of context (0 for padding)
    query_pos: torch.Tensor  # [B, Qmax] position of each query
    context_len: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, 1, Qmax, Lmax] True where attention is allowed
    windowed: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask_for(self, sliding_window: int | None) -> torch.Tensor:
        if not sliding_window:
            return self.mask
        if sliding_window not in self.windowed:
            key_pos = torch.arange(self.mask.shape[-1], device=self.mask.device)
            near = (self.query_pos[:, :, None] - key_pos[None, None, :]) < sliding_window
            self.windowed[sliding_window] = self.mask & near[:, None]
        return self.windowed[sliding_window]


@dataclass
class PagedStep:
    cache: PagedKVCache
    slots: torch.Tensor  # [tokens] slot each new token's KV is written to
    groups: list[AttentionGroup]
    num_tokens: int


def build_step(cache: PagedKVCache, spans: list[SequenceSpan], device: torch.device) -> PagedStep:
    """Metadata for one forward over ``spans`` packed in order."""
    starts, offset = [], 0
    for span in spans:
        starts.append(offset)
        offset += span.query_len
    new_slots: list[int] = []
    for span in spans:
        new_slots.extend(cache.slots_of(span.blocks, span.cached_len, span.cached_len + span.query_len))
    decode = [i for i, s in enumerate(spans) if s.query_len == 1]
    prefill = [i for i, s in enumerate(spans) if s.query_len > 1]
    groups = [
        _build_group([spans[i] for i in members], [starts[i] for i in members], cache.block_size, device)
        for members in (decode, prefill)
        if members
    ]
    slots = torch.tensor(new_slots, dtype=torch.long, device=device)
    return PagedStep(cache, slots, groups, offset)


def _build_group(spans: list[SequenceSpan], starts: list[int], block_size: int, device: torch.device) -> AttentionGroup:
    q_max = max(s.query_len for s in spans)
    n_blocks = -(-max(s.cached_len + s.query_len for s in spans) // block_size)
    l_max = n_blocks * block_size  # context is gathered whole blocks at a time
    batch = len(spans)
    query_index = torch.zeros(batch, q_max, dtype=torch.long)
    query_pos = torch.zeros(batch, q_max, dtype=torch.long)
    block_table = torch.zeros(batch, n_blocks, dtype=torch.long)
    context_len = torch.zeros(batch, dtype=torch.long)
    valid = torch.zeros(batch, q_max, dtype=torch.bool)
    for b, (span, start) in enumerate(zip(spans, starts, strict=True)):
        n, total = span.query_len, span.cached_len + span.query_len
        query_index[b, :n] = torch.arange(start, start + n)
        query_pos[b, :n] = torch.arange(span.cached_len, total)
        valid[b, :n] = True
        used = span.blocks[: -(-total // block_size)]
        block_table[b, : len(used)] = torch.tensor(used, dtype=torch.long)
        context_len[b] = total
    key_pos = torch.arange(l_max)
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & valid[:, :, None]
    # Padding queries attend to position 0 so that no softmax row is empty (no NaN);
    # their outputs are never read.
    mask[:, :, 0] |= ~valid
    valid_rows = valid.flatten().nonzero().squeeze(1)
    return AttentionGroup(
        packed_rows=query_index.flatten()[valid_rows].to(device),
        query_index=query_index.to(device),
        valid_rows=valid_rows.to(device),
        block_table=block_table.flatten().to(device),
        query_pos=query_pos.to(device),
        context_len=context_len.to(device),
        mask=mask[:, None].to(device),
    )


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
    cache, layer = paged_step.cache, int(module.layer_idx)  # type: ignore[arg-type]
    cache.write(layer, paged_step.slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    q = query[0].transpose(0, 1)  # [tokens, heads, head_dim]
    out = torch.empty_like(q)
    for group in paged_step.groups:
        out[group.packed_rows] = _attend_group(q, cache, layer, group, scaling, sliding_window)
    return out.unsqueeze(0), None  # [1, tokens, heads, head_dim]


def _attend_group(
    q: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    group: AttentionGroup,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    batch, q_max = group.query_index.shape
    heads, head_dim = q.shape[1], q.shape[2]
    gq = q[group.query_index].transpose(1, 2)  # [B, heads, Qmax, head_dim]
    gk, gv = cache.gather(layer, group.block_table, batch)  # [B, Lmax, kv_heads, head_dim]
    gk, gv = gk.transpose(1, 2).to(gq.dtype), gv.transpose(1, 2).to(gq.dtype)  # [B, kv_heads, Lmax, head_dim]
    attn = F.scaled_dot_product_attention(
        gq,
        gk,
        gv,
        attn_mask=group.mask_for(sliding_window),
        scale=scaling,
        enable_gqa=gk.shape[1] != heads,
    )  # [B, heads, Qmax, head_dim]
    flat = attn.transpose(1, 2).reshape(batch * q_max, heads, head_dim)
    return flat[group.valid_rows]


def _no_mask(*args, **kwargs) -> None:
    # Masks come from PagedStep; transformers' own mask would be wasted work.
    return None


def register() -> str:
    """Registers the attention function and its (empty) mask; returns the implementation name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    return ATTENTION_NAME
