"""Per-row maximum and its position, log-sum-exp, sums and exponentials, each row on its own.

Why: torch splits the reduction of a single row across threads but gives each
of several rows to one thread, so the same logits summed alone (one request in
the step) and among others came out a bit different, and so did the logprob a
client sees. ``shard/numerics/kernels/rows.c`` reduces each row on one thread in an order
fixed by the row's width. On devices without the C kernels (CUDA) torch's
reductions are used.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from shard.numerics.kernels import load_library


class RowKernel:
    def __init__(self, library: ctypes.CDLL):
        self.max_logsumexp = library.rows_max_logsumexp
        self.sum = library.rows_sum
        self.exp_shifted = library.rows_exp_shifted
        self.argmax = library.rows_argmax
        pointer, size, threads = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.max_logsumexp.argtypes = [pointer, size, size, pointer, pointer, pointer, threads]
        self.sum.argtypes = [pointer, size, size, pointer, threads]
        self.exp_shifted.argtypes = [pointer, size, size, pointer, pointer, threads]
        self.argmax.argtypes = [pointer, size, size, pointer, threads]
        for function in (self.max_logsumexp, self.sum, self.exp_shifted, self.argmax):
            function.restype = None


@functools.cache
def row_kernel() -> RowKernel | None:
    library = load_library("rows")
    return None if library is None else RowKernel(library)


def _kernel_for(x: torch.Tensor) -> RowKernel | None:
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
        return None
    kernel = row_kernel()
    if kernel is None:
        raise RuntimeError("the row reduction kernel could not be built (a C compiler is needed)")
    return kernel


def max_logsumexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's maximum, log-sum-exp (exp arguments clamped at -80 below the maximum) and
    the index of its maximum (as ``row_argmax``), in one call while each row is in cache."""
    kernel = _kernel_for(x)
    if kernel is None:
        best = x.amax(dim=-1)
        lse = best + (x - best[:, None]).clamp(min=-80.0).exp().sum(dim=-1).log()
        return best, lse, x.max(dim=-1)[1]
    x = x.contiguous()
    best, lse = x.new_empty(x.shape[0]), x.new_empty(x.shape[0])
    index = torch.empty(x.shape[0], dtype=torch.int64)
    kernel.max_logsumexp(
        x.data_ptr(), x.shape[0], x.shape[1], best.data_ptr(), lse.data_ptr(), index.data_ptr(), torch.get_num_threads()
    )
    return best, lse, index


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """Where each row first holds its maximum; a NaN counts as the maximum (torch.max's index).
    Faster than torch.max(dim) too (docs/performance.md, "Sampling")."""
    kernel = _kernel_for(x)
    if kernel is None:
        return x.max(dim=-1)[1]
    x = x.contiguous()
    index = torch.empty(x.shape[0], dtype=torch.int64)
    kernel.argmax(x.data_ptr(), x.shape[0], x.shape[1], index.data_ptr(), torch.get_num_threads())
    return index


def row_sums(x: torch.Tensor) -> torch.Tensor:
    kernel = _kernel_for(x)
    if kernel is None:
        return x.sum(dim=-1)
    x = x.contiguous()
    out = x.new_empty(x.shape[0])
    kernel.sum(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def exp_shifted(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """exp(x - shift[:, None]) with arguments clamped at -80 (unnormalised probabilities)."""
    kernel = _kernel_for(x)
    if kernel is None:
        return (x - shift[:, None]).clamp(min=-80.0).exp()
    x, shift = x.contiguous(), shift.contiguous().float()
    out = torch.empty_like(x)
    kernel.exp_shifted(x.data_ptr(), x.shape[0], x.shape[1], shift.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out
