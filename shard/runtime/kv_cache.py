"""The paged KV cache: per layer, K and V tensors of ``num_blocks * block_size`` slots.

The router owns block allocation; the shard only writes the slots a request's
block table maps its positions to (``slot_of``), and reads them back in attention.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVLayout:
    """Shape of one token's KV in one layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


class PagedKVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, block_size: int, device: torch.device):
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = block_size
        num_slots = num_blocks * block_size
        shape = (num_slots, layout.num_kv_heads, layout.head_dim)
        # keys[layer], values[layer]: [num_slots, kv_heads, head_dim]
        self.keys = [_zeros(shape, layout.dtype, device) for _ in range(layout.num_layers)]
        self.values = [_zeros(shape, layout.dtype, device) for _ in range(layout.num_layers)]
        #: Each layer's K and V memory address ([layers] int64), for kernels that take the whole
        #: cache (shard.numerics.native_layer); fixed for the cache's life.
        self.addresses = (_addresses_of(self.keys), _addresses_of(self.values))
        #: Blocks 0 .. resident_blocks-1 are mapped in every layer (``make_resident``'s progress).
        self.resident_blocks = 0

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def make_resident(
        self,
        stop: threading.Event,
        blocks_per_call: int = 8,
        may_run: Callable[[], bool] = lambda: True,
        deadline: float | None = None,
    ) -> int:
        """Faults in every page of a CPU cache without changing a byte; returns the bytes done.

        Why: the cache is calloc'ed memory that the OS maps on first write, and on a VM whose
        host backs guest memory lazily a first write is ~100x slower than a write to a mapped
        page; left to the steps, the model thread pays it while its OpenMP team waits
        (docs/performance.md, "KV cache memory"). MADV_POPULATE_WRITE (Linux 5.14) maps a
        range writable as a write would, but leaves its contents alone, so it is safe while
        steps write KV. Lowest blocks first: the router hands out never-used blocks in that
        order. Each call maps ``blocks_per_call`` blocks of one layer's K or V once ``may_run()``
        allows it. Stops early when ``stop`` is set, at ``deadline``
        (``time.monotonic()``), or when the kernel refuses (older kernels); a later call goes on
        from the first block not yet done (``resident_blocks``)."""
        populate = _populate_write()
        if populate is None or self.keys[0].device.type != "cpu":
            return 0
        done = 0
        for first in range(self.resident_blocks, self.num_blocks, blocks_per_call):
            if deadline is not None and time.monotonic() >= deadline:
                return done
            for tensor in (*self.keys, *self.values):
                while not may_run():
                    if stop.wait(IDLE_POLL_S):
                        return done
                if stop.is_set():
                    return done
                start, end = page_span(tensor.view(self.num_blocks, -1)[first : first + blocks_per_call])
                if populate(start, end - start, MADV_POPULATE_WRITE) != 0:
                    log.info("KV cache left to fault in on first use: madvise says %s", os.strerror(ctypes.get_errno()))
                    self.resident_blocks = self.num_blocks  # nothing more to try
                    return done
                done += end - start
            # Every tensor's part of these blocks is mapped (a call stopped half-way redoes them: harmless).
            self.resident_blocks = min(first + blocks_per_call, self.num_blocks)
        return done

    def make_resident_in_background(self, may_run: Callable[[], bool]) -> threading.Event:
        """``make_resident`` on a daemon thread, between steps only; set the event to stop it.

        Only while ``may_run()`` (the engine has been idle a while): running freely, even at
        nice 19, its page faults delayed the OpenMP workers' wake-ups (docs/performance.md,
        "KV cache memory"). Idle time before the first
        request and between bursts gets it ahead of the allocator; a load that starts at
        once and never pauses pays for the first blocks it reaches, as without it."""
        stop = threading.Event()

        def run() -> None:
            with contextlib.suppress(AttributeError, OSError):  # per-thread nice is Linux's
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            started = time.monotonic()
            done = self.make_resident(stop, may_run=may_run)
            if done:
                log.info("KV cache resident: %.2f GiB, %.1f s after warmup", done / 2**30, time.monotonic() - started)

        threading.Thread(target=run, name="kv-resident", daemon=True).start()
        return stop

    def slots_of(self, blocks: list[int], start: int, end: int) -> list[int]:
        """Slots of positions ``start..end-1`` of a sequence with block table ``blocks``."""
        size = self.block_size
        return [blocks[p // size] * size + p % size for p in range(start, end)]

    def gather(self, layer: int, block_table: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks.

        block_table: [batch * n_blocks] -> [batch, n_blocks * block_size, kv_heads, head_dim].

        Copying whole blocks (contiguous rows) with index_select is about 3x faster
        on CPU than indexing slot by slot.
        """
        shape = (batch, -1, self.layout.num_kv_heads, self.layout.head_dim)
        keys = self.keys[layer].view(self.num_blocks, -1).index_select(0, block_table).view(shape)
        values = self.values[layer].view(self.num_blocks, -1).index_select(0, block_table).view(shape)
        return keys, values

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        # key/value: [tokens, kv_heads, head_dim]
        self.keys[layer].index_copy_(0, slots, key.to(self.layout.dtype))
        self.values[layer].index_copy_(0, slots, value.to(self.layout.dtype))


PAGE = mmap.PAGESIZE
MADV_POPULATE_WRITE = 23  # linux/mman.h, every architecture
IDLE_POLL_S = 0.02


def page_span(tensor: torch.Tensor) -> tuple[int, int]:
    """The page-aligned addresses around a contiguous tensor's bytes (the pages around a
    range of an allocation lie in its mapping)."""
    start = tensor.data_ptr()
    return start // PAGE * PAGE, -(-(start + tensor.nbytes) // PAGE) * PAGE


@functools.cache
def _populate_write() -> Callable[[int, int, int], int] | None:
    """The C library's madvise, where MADV_POPULATE_WRITE can exist (Linux)."""
    if sys.platform != "linux":
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _addresses_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed KV memory. On CPU through calloc (numpy.zeros): the OS hands out zero
    pages as they are first touched, so a cache of several GiB costs nothing at
    Warmup (torch.zeros writes every page: docs/performance.md, "KV cache memory").
    Zeros, not garbage: a masked slot read by the gathering backend is multiplied
    by a zero weight, which must not meet a NaN bit pattern."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    return torch.from_numpy(numpy.zeros(nbytes, dtype=numpy.uint8)).view(dtype).view(shape)


def kv_layout_of(config, dtype: torch.dtype, world_size: int = 1) -> KVLayout:
    """KV shape of a transformers decoder config, per rank under tensor parallelism."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return KVLayout(text.num_hidden_layers, max(1, kv_heads // world_size), head_dim, dtype)
