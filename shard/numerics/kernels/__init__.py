"""CPU kernels written in C, compiled on the host at first use and called through ctypes.

Why C and not a torch extension: a plain C file with no torch headers compiles in
well under a second with the system compiler, for the exact CPU it runs on
(``-march=native``), and needs nothing at install time. The shared object is
cached under ``SWITCHYARD_CACHE`` (default ``~/.cache/switchyard``) by a hash of
source, flags, compiler and CPU (``-march=native`` code does not run on a CPU with
fewer instructions, e.g. a cache volume moved to another host), so every shard
process after the first just loads it.

``paged_decode`` (attention straight from the paged cache), ``linear`` (step-
invariant matrix products, see ``shard.numerics.invariant_linear``) and ``rows`` (per-row
reductions, see ``shard.numerics.row_reductions``) live here. Where no compiler is found or
a build fails, ``load_library`` returns None with a warning; attention then keeps
its torch path, the linear and row kernels refuse to serve without them.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from common.disk_cache import cache_root, digest, host_fingerprint, written_atomically

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
FLAGS = [
    "-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-shared",
    "-fPIC",
]  # fmt: skip
# No -fassociative-math or -ffast-math: every kernel spells out its order of operations
# (fixed_order.h), which is what makes a token's result independent of its step, and the
# compiler gets no licence to change it. -ffp-contract=off: GCC's default would fuse a
# written a * b + c into one FMA where it sees fit; fused multiply-adds are written as such.


def cache_dir() -> Path:
    return cache_root() / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.cache
def _compiler_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout


def _build(compiler: str, name: str) -> Path:
    """The shared object of ``name``.c, built for this host unless the cache has it."""
    source = HERE / f"{name}.c"
    version = _compiler_version(compiler)
    headers = [h.read_text() for h in sorted(HERE.glob("*.h"))]
    key = digest([source.read_text(), *headers, *FLAGS, version, host_fingerprint()])[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    # Concurrent shards (tensor-parallel ranks) may build at once: each writes its own file.
    with written_atomically(target, ".so") as partial:
        subprocess.run(
            [compiler, *FLAGS, "-I", str(HERE), "-o", str(partial), str(source), "-lm"], check=True, capture_output=True
        )
    return target


class PagedDecodeKernel:
    """Decode attention straight from the paged KV cache (see paged_decode.c)."""

    DTYPES = (torch.bfloat16, torch.float32)

    def __init__(self, library: ctypes.CDLL):
        self._functions = {torch.bfloat16: library.paged_decode_bf16, torch.float32: library.paged_decode_f32}
        for function in self._functions.values():
            function.restype = ctypes.c_int
            function.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6 + [ctypes.c_float] + [ctypes.c_int] * 2

    def supports(self, dtype: torch.dtype, device: torch.device) -> bool:
        return device.type == "cpu" and dtype in self.DTYPES

    def compute(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_table: torch.Tensor,
        context_len: torch.Tensor,
        block_size: int,
        scale: float,
        window: int,
    ) -> torch.Tensor:
        """query [batch, heads, head_dim]; caches [slots, kv_heads, head_dim]; block_table [batch, max_blocks].

        Returns [batch, heads, head_dim] in the query's dtype.
        """
        dtype = query.dtype
        if dtype != key_cache.dtype or not query.is_contiguous():
            query = query.to(key_cache.dtype).contiguous()
        if not block_table.is_contiguous():
            block_table = block_table.contiguous()
        if not context_len.is_contiguous():
            context_len = context_len.contiguous()
        out = torch.empty_like(query)
        batch, heads, head_dim = query.shape
        status = self._functions[key_cache.dtype](
            query.data_ptr(),
            key_cache.data_ptr(),
            value_cache.data_ptr(),
            block_table.data_ptr(),
            context_len.data_ptr(),
            out.data_ptr(),
            batch,
            heads,
            key_cache.shape[1],
            head_dim,
            block_table.shape[1],
            block_size,
            scale,
            window,
            torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError(f"paged decode kernel failed with status {status}")
        return out if out.dtype == dtype else out.to(dtype)


def paged_decode_op(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: torch.Tensor,
    block_size: int,
    scale: float,
    window: int,
) -> torch.Tensor:
    """Paged attention of each query row over its context (``PagedDecodeKernel.compute``).

    A plain call, not a torch operator: nothing compiles the step, and the dispatcher cost
    ~30 us per call, once per layer per step."""
    kernel = paged_decode_kernel()
    if kernel is None:
        raise RuntimeError("the paged decode kernel is not available on this host")
    return kernel.compute(query, key_cache, value_cache, block_table, context_len, block_size, scale, window)


@functools.cache
def load_library(name: str) -> ctypes.CDLL | None:
    """The compiled ``name``.c, or None (with a warning) where this host cannot build it."""
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found: the %s kernel is not available", name)
        return None
    try:
        return ctypes.CDLL(str(_build(compiler, name)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        log.warning(
            "building the %s kernel failed (%s%s)",
            name,
            error,
            (": " + detail.decode(errors="replace")[-500:]) if detail else "",
        )
        return None


@functools.cache
def paged_decode_kernel() -> PagedDecodeKernel | None:
    """The compiled attention kernel, or None where this host cannot build it (attention then
    keeps its portable torch path)."""
    library = load_library("paged_decode")
    return None if library is None else PagedDecodeKernel(library)
