"""The CPU backend: every query attends straight from the paged cache, one query at a time.

Uses the C kernel of ``shard.numerics.kernels`` (no copy of the context, keys and values
read in place). Prompt tokens go through it as one-token queries of their own
(``AttentionGroup.per_query``), so a token's attention reduces over its context
in the same order whether it is decoded, prefilled in one step, prefilled in
chunks, or read after a prefix-cache hit. ``backend()`` returns None where the
kernel cannot be built, and the engine keeps the portable backend.
"""

from __future__ import annotations

import torch

from shard.numerics.attention.step import AttentionGroup, GroupAttention
from shard.numerics.kernels import paged_decode_kernel, paged_decode_op
from shard.runtime.kv_cache import PagedKVCache


def attend(
    q: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    group: AttentionGroup,
    scaling: float,
    sliding_window: int | None,
) -> torch.Tensor:
    tables, context_len = group.per_query()
    return paged_decode_op(
        q[group.packed_rows],
        cache.keys[layer],
        cache.values[layer],
        tables,
        context_len,
        cache.block_size,
        scaling,
        sliding_window or 0,
    )


def backend(device: torch.device, dtype: torch.dtype) -> GroupAttention | None:
    if device.type != "cpu":
        return None
    kernel = paged_decode_kernel()
    if kernel is None or not kernel.supports(dtype, device):
        return None
    return attend
