"""Per-step attention metadata: which KV slots each token writes, which context each query reads.

Sequences are grouped by query length (decode tokens vs prefill chunks) and
padded only inside a group, so a long prompt never pads the decode tokens.
``PagedStep`` is built once per forward and reaches every layer through the
forward's kwargs, not through a global; it also names the backend that attends
each kind of group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from shard.runtime.kv_cache import PagedKVCache


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
    valid: torch.Tensor  # [B, Qmax] True for real queries
    context_blocks: int  # blocks of context per sequence, padded to the group's longest
    block_size: int
    #: Masks by sliding window (0: none), built on first use: the CPU kernel never needs one.
    masks: dict[int, torch.Tensor] = field(default_factory=dict)
    #: ``per_query()``'s tensors, built on first use (once per step, not per layer).
    _per_query: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def batch(self) -> int:
        return int(self.query_index.shape[0])

    @property
    def is_decode(self) -> bool:
        return int(self.query_index.shape[1]) == 1

    def per_query(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every real query as a one-token query of its own: its sequence's block table row
        [group tokens, n_blocks] and its context length (its position + 1) [group tokens],
        in ``packed_rows`` order. A prompt token then attends exactly as it would in a
        decode step at that position (one numerical path for prefill, chunks and decode)."""
        if self._per_query is None:
            tables = self.block_table.view(self.batch, -1)
            if self.is_decode:
                self._per_query = (tables, self.context_len)
            else:
                sequence = self.valid_rows // self.query_index.shape[1]
                self._per_query = (tables[sequence], self.query_pos.flatten()[self.valid_rows] + 1)
        return self._per_query

    def mask_for(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, Qmax, Lmax], True where a query may attend a key."""
        window = sliding_window or 0
        if window not in self.masks:
            key_pos = torch.arange(self.context_blocks * self.block_size, device=self.query_pos.device)
            mask = (key_pos[None, None, :] <= self.query_pos[:, :, None]) & self.valid[:, :, None]
            if window:
                mask &= (self.query_pos[:, :, None] - key_pos[None, None, :]) < window
            # Padding queries attend to position 0 so that no softmax row is empty (no NaN);
            # their outputs are never read.
            mask[:, :, 0] |= ~self.valid
            self.masks[window] = mask[:, None]
        return self.masks[window]


class GroupAttention(Protocol):
    """A backend: attends one group's queries to their cached context.

    q: [tokens, heads, head_dim] (the whole packed step); returns
    [group tokens, heads, head_dim] in ``group.packed_rows`` order.
    """

    def __call__(
        self,
        q: torch.Tensor,
        cache: PagedKVCache,
        layer: int,
        group: AttentionGroup,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor: ...


@dataclass
class PagedStep:
    cache: PagedKVCache
    slots: torch.Tensor  # [tokens] slot each new token's KV is written to
    groups: list[AttentionGroup]
    num_tokens: int
    #: Backends for groups of one-token queries and for longer (prefill) queries.
    decode_attention: GroupAttention
    prefill_attention: GroupAttention
    #: What the step's layers share in the one-call layer (shard.numerics.native_layer): built by the
    #: first layer; False where the step is not that path's to run.
    native: Any = None

    def attention_for(self, group: AttentionGroup) -> GroupAttention:
        return self.decode_attention if group.is_decode else self.prefill_attention


def build_step(
    cache: PagedKVCache,
    spans: list[SequenceSpan],
    device: torch.device,
    decode_attention: GroupAttention,
    prefill_attention: GroupAttention,
) -> PagedStep:
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
    return PagedStep(cache, slots, groups, offset, decode_attention, prefill_attention)


def _build_group(spans: list[SequenceSpan], starts: list[int], block_size: int, device: torch.device) -> AttentionGroup:
    # Built as Python lists and turned into tensors once: per-sequence tensor writes cost
    # several small ops per sequence (docs/performance.md, "Fewer calls per layer and per step").
    q_max = max(s.query_len for s in spans)
    n_blocks = -(-max(s.cached_len + s.query_len for s in spans) // block_size)
    query_index: list[int] = []
    query_pos: list[int] = []
    valid: list[bool] = []
    block_table: list[int] = []
    context_len: list[int] = []
    for span, start in zip(spans, starts, strict=True):
        n, total = span.query_len, span.cached_len + span.query_len
        pad = q_max - n
        query_index += [*range(start, start + n), *[0] * pad]
        query_pos += [*range(span.cached_len, total), *[0] * pad]
        valid += [True] * n + [False] * pad
        used = span.blocks[: -(-total // block_size)]
        block_table += [*used, *[0] * (n_blocks - len(used))]
        context_len.append(total)
    batch = len(spans)
    valid_t = torch.tensor(valid, dtype=torch.bool).view(batch, q_max)
    index_t = torch.tensor(query_index, dtype=torch.long)
    valid_rows = valid_t.flatten().nonzero().squeeze(1)
    return AttentionGroup(
        packed_rows=index_t[valid_rows].to(device),
        query_index=index_t.view(batch, q_max).to(device),
        valid_rows=valid_rows.to(device),
        block_table=torch.tensor(block_table, dtype=torch.long, device=device),
        query_pos=torch.tensor(query_pos, dtype=torch.long, device=device).view(batch, q_max),
        context_len=torch.tensor(context_len, dtype=torch.long, device=device),
        valid=valid_t.to(device),
        context_blocks=n_blocks,
        block_size=block_size,
    )
