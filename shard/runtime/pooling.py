"""Embeddings: a sequence's final hidden states (after the model's final norm), pooled.

A request that embeds rather than generates names a pooling: the last token's
state (e5-mistral, gte-Qwen), the first token's (a CLS model's), or the mean of
every token's. The engine keeps the rows a pooling needs as its chunks are
computed, and answers the pooled vector when the input is complete, sampling
nothing. Rows are computed by the same step-invariant forward as any token, and
the mean reduces the request's own rows, gathered in order, in one call: an
embedding is the same bits however its input was chunked and whatever shared
its steps.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from shard.runtime.errors import InvalidRequest


class Pooling(enum.IntEnum):
    """shard.proto's Pooling values."""

    NONE = 0
    LAST = 1
    MEAN = 2
    FIRST = 3


@dataclass
class PooledRows:
    """The final hidden states a pooling has collected so far for one sequence."""

    pooling: Pooling
    rows: list[torch.Tensor] = field(default_factory=list)

    def wanted(self, start: int, end: int, total: int) -> range:
        """Offsets, within a chunk computing positions [start, end) of ``total``, of the rows to keep."""
        if self.pooling is Pooling.MEAN:
            return range(end - start)
        if self.pooling is Pooling.FIRST:
            return range(1) if start == 0 else range(0)
        return range(end - start - 1, end - start) if end == total else range(0)

    def vector(self) -> list[float]:
        """The pooled embedding (float32) once every wanted row is in."""
        stacked = torch.cat(self.rows).float()
        if self.pooling is Pooling.MEAN:
            return stacked.mean(dim=0).tolist()
        return stacked[0].tolist()


def final_norm(model: Any) -> torch.nn.Module:
    """The module whose output is the model's final hidden states (the norm before the head)."""
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None)
    if not isinstance(norm, torch.nn.Module):
        raise InvalidRequest(f"embeddings are not supported for {type(model).__name__}: no final norm to read")
    return norm


@contextmanager
def captured_output(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects ``module``'s outputs while the block runs (the forward that transformers drives)."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()
