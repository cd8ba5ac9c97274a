"""The CPU decode kernel against the portable backend (gather + SDPA) on random caches.

Shapes cover the AVX512-BF16 path (bf16, head_dim a multiple of 64) and the
portable C path (fp32, other head dims), grouped-query attention, contexts that
end mid-block, a one-token context and sliding windows.
"""

from __future__ import annotations

import pytest
import torch

from shard.numerics.attention import gathered_sdpa
from shard.numerics.attention.cpu_paged import backend
from shard.numerics.attention.step import SequenceSpan, build_step
from shard.runtime.kv_cache import KVLayout, PagedKVCache

BLOCK = 16
CASES = [
    # dtype, heads, kv_heads, head_dim, window
    (torch.bfloat16, 9, 3, 64, None),
    (torch.bfloat16, 8, 8, 128, None),
    (torch.bfloat16, 4, 2, 64, 20),
    (torch.bfloat16, 10, 2, 64, None),  # five query heads per KV head: two value passes (4 + 1)
    (torch.bfloat16, 14, 2, 128, 33),  # seven per KV head (4 + 3), two 64-dim chunks
    (torch.bfloat16, 4, 2, 192, 50),  # a head size whose query vectors are reloaded per key (score16)
    (torch.bfloat16, 6, 2, 48, None),  # bf16 without the vector path
    (torch.float32, 6, 2, 32, None),
    (torch.float32, 4, 1, 80, 7),
]


@pytest.mark.parametrize(("dtype", "heads", "kv_heads", "head_dim", "window"), CASES)
def test_kernel_matches_gathered_sdpa(dtype, heads, kv_heads, head_dim, window):
    kernel = backend(torch.device("cpu"), dtype)
    if kernel is None:
        pytest.skip("no C compiler on this host")
    generator = torch.Generator().manual_seed(heads * head_dim)
    lengths = [1, 15, 16, 17, 100, 250]
    cache, spans = _random_cache(KVLayout(1, kv_heads, head_dim, dtype), 64, lengths, generator)
    step = build_step(cache, spans, torch.device("cpu"), kernel, gathered_sdpa.attend)
    (group,) = step.groups
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype)
    scale = head_dim**-0.5
    got = kernel(q, cache, 0, group, scale, window).float()
    want = gathered_sdpa.attend(q.float(), _as_fp32(cache), 0, group, scale, window)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


def _random_cache(
    layout: KVLayout, blocks: int, lengths: list[int], generator: torch.Generator
) -> tuple[PagedKVCache, list[SequenceSpan]]:
    """A one-layer cache of random keys and values, and one decode query's span per length,
    each on blocks scattered over the cache as under load."""
    cache = PagedKVCache(layout, blocks, BLOCK, torch.device("cpu"))
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=generator))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=generator))
    order = torch.randperm(blocks, generator=generator).tolist()
    spans, used = [], 0
    for length in lengths:
        n = -(-length // BLOCK)
        spans.append(SequenceSpan(1, length - 1, order[used : used + n]))
        used += n
    return cache, spans


def _as_fp32(cache: PagedKVCache) -> PagedKVCache:
    layout = KVLayout(1, cache.layout.num_kv_heads, cache.layout.head_dim, torch.float32)
    copy = PagedKVCache(layout, cache.num_blocks, cache.block_size, torch.device("cpu"))
    copy.keys[0].copy_(cache.keys[0])
    copy.values[0].copy_(cache.values[0])
    return copy


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_each_row_is_its_own_whatever_the_batch_and_threads(threads):
    """Forty sequences in one call (threads fetch their next sequence while computing one):
    every row has exactly the bits it has alone, so no row is skipped, repeated or mixed up."""
    kernel = backend(torch.device("cpu"), torch.bfloat16)
    if kernel is None:
        pytest.skip("no C compiler on this host")
    generator = torch.Generator().manual_seed(threads)
    lengths = torch.randint(1, 90, (40,), generator=generator).tolist()
    cache, spans = _random_cache(KVLayout(1, 3, 64, torch.bfloat16), 256, lengths, generator)
    q = torch.randn(len(lengths), 9, 64, generator=generator).to(torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (group,) = build_step(cache, spans, torch.device("cpu"), kernel, gathered_sdpa.attend).groups
        together = kernel(q, cache, 0, group, 0.125, None)
        for row, span in enumerate(spans):
            (alone,) = build_step(cache, [span], torch.device("cpu"), kernel, gathered_sdpa.attend).groups
            assert torch.equal(kernel(q[row : row + 1], cache, 0, alone, 0.125, None)[0], together[row]), row
    finally:
        torch.set_num_threads(before)
