"""The CPU decode backend: one-token queries attend straight from the paged cache.

Uses the C kernel of ``shard.kernels`` (no copy of the context, keys and values
each read once per sequence); ``backend()`` returns None where it cannot be
built, and the engine keeps the portable backend.
"""

from __future__ import annotations

import torch

from shard.attention.step import AttentionGroup, GroupAttention
from shard.kernels import paged_decode_kernel, paged_decode_op
from shard.kv_cache import PagedKVCache


def attend(
    q: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    group: AttentionGroup,
    scaling: float,
    sliding_window: int | None,
) -> torch.Tensor:
    return paged_decode_op(
        q[group.packed_rows],
        cache.keys[layer],
        cache.values[layer],
        group.block_table.view(group.batch, -1),
        group.context_len,
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
