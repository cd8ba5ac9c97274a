"""The portable backend: gather each sequence's context blocks, then torch SDPA.

Works on every device and for every query length; on CUDA it is the SDPA
(flash / memory-efficient) path. On CPU it copies the whole context of every
sequence once per layer, which is what the C decode kernel avoids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shard.numerics.attention.step import AttentionGroup
from shard.runtime.kv_cache import PagedKVCache


def attend(
    q: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    group: AttentionGroup,
    scaling: float,
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
