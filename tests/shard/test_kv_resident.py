"""The KV cache's memory is faulted in ahead of use without changing a byte of it."""

from __future__ import annotations

import ctypes
import sys
import threading
import time

import pytest
import torch

from common.model_source import resolve_model
from shard.loading.model_loader import load_model
from shard.runtime.engine import Engine
from shard.runtime.kv_cache import PAGE, KVLayout, PagedKVCache, page_span

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's")

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)


def resident_pages(tensor: torch.Tensor) -> tuple[int, int]:
    """(resident, total) pages under the tensor, from mincore(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    start, end = page_span(tensor)
    pages = (end - start) // PAGE
    vector = (ctypes.c_ubyte * pages)()
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(start, end - start, vector) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vector), pages


def test_make_resident_maps_every_page_and_keeps_the_contents():
    cache = PagedKVCache(LAYOUT, num_blocks=16384, block_size=16, device=torch.device("cpu"))  # 64 MiB a tensor
    written = torch.randn(16, 2, 64).to(torch.bfloat16)
    cache.keys[1][32:48] = written  # block 2 of layer 1 holds KV already
    # (Whether the rest is mapped yet depends on where the allocator found the memory: in a
    # long test session it can be recycled pages.)

    done = cache.make_resident(threading.Event(), blocks_per_call=7)  # ranges that straddle pages

    total = sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values))
    assert done >= total
    for tensor in (*cache.keys, *cache.values):
        assert resident_pages(tensor)[0] == resident_pages(tensor)[1]
    assert torch.equal(cache.keys[1][32:48], written)
    cache.keys[1][32:48] = 0
    assert all(not t.any() for t in (*cache.keys, *cache.values))


def test_writes_during_the_background_pass_survive_it():
    cache = PagedKVCache(LAYOUT, num_blocks=4096, block_size=16, device=torch.device("cpu"))  # 64 MiB
    stop = threading.Event()
    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(cache.make_resident(stop, blocks_per_call=16)))
    thread.start()
    rows = torch.arange(0, 4096 * 16, 97)
    for layer in range(LAYOUT.num_layers):
        cache.write(layer, rows, torch.ones(len(rows), 2, 64), torch.full((len(rows), 2, 64), 2.0))
    thread.join(timeout=120)
    assert done and done[0] > 0
    for layer in range(LAYOUT.num_layers):
        assert bool((cache.keys[layer][rows] == 1).all()) and bool((cache.values[layer][rows] == 2).all())
        assert int((cache.keys[layer] != 0).sum()) == len(rows) * 2 * 64


def test_a_set_stop_ends_the_pass():
    cache = PagedKVCache(LAYOUT, num_blocks=64, block_size=16, device=torch.device("cpu"))
    stop = threading.Event()
    stop.set()
    assert cache.make_resident(stop) == 0


def test_nothing_is_mapped_while_the_engine_is_busy():
    cache = PagedKVCache(LAYOUT, num_blocks=64, block_size=16, device=torch.device("cpu"))
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(cache.make_resident(stop, may_run=lambda: False)))
    thread.start()
    thread.join(timeout=0.2)
    assert thread.is_alive()  # waiting for an idle engine
    stop.set()
    thread.join(timeout=5)
    assert result == [0]  # not a byte mapped


def test_a_later_pass_goes_on_where_an_earlier_one_stopped():
    cache = PagedKVCache(LAYOUT, num_blocks=1024, block_size=16, device=torch.device("cpu"))
    tensors = 2 * LAYOUT.num_layers
    stop, asked = threading.Event(), [0]

    def may_run() -> bool:  # stops the pass as it reaches its fourth group of blocks
        asked[0] += 1
        if asked[0] > 3 * tensors:
            stop.set()
        return True

    first = cache.make_resident(stop, blocks_per_call=16, may_run=may_run)
    assert cache.resident_blocks == 48
    rest = cache.make_resident(threading.Event(), blocks_per_call=16)

    total = sum(t.nbytes for t in (*cache.keys, *cache.values))
    assert cache.resident_blocks == 1024
    assert 0 < first < rest and total <= first + rest  # (each call rounds its range out to whole pages)
    for tensor in (*cache.keys, *cache.values):
        assert resident_pages(tensor)[0] == resident_pages(tensor)[1]


def test_a_pass_past_its_deadline_maps_nothing():
    cache = PagedKVCache(LAYOUT, num_blocks=64, block_size=16, device=torch.device("cpu"))
    assert cache.make_resident(threading.Event(), deadline=time.monotonic() - 1) == 0
    assert cache.resident_blocks == 0


def test_warmup_maps_the_cache_before_it_returns(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir("llama")))
    model = load_model(source, torch.float32, torch.device("cpu"), quantize="none")
    engine = Engine(model, torch.device("cpu"), 4, kv_fraction=0.5, kv_prefault=True, kv_prefault_ready_s=60)
    engine.warmup(64, 4, 8192)
    assert engine.cache is not None and engine.cache.resident_blocks == engine.cache.num_blocks
    engine.clear(None)
