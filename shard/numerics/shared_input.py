"""Projections of the same input as one matmul: attention's q/k/v, the MLP's gate/up.

Why: a decode step is bound by streaming weights, and each matmul call has a
fixed cost on top (dispatch, a parallel region, a partial last tile). One call
over the concatenated weights instead of three (two) saves it (docs/performance.md,
"Fused projections").

transformers' modules call ``self.q_proj(x)``, ``self.k_proj(x)``,
``self.v_proj(x)`` in turn on the same ``x``, so the model code stays as it is:
each projection becomes a ``SharedInputSlice``; the first one called computes
the product of every slice and keeps it, the others take their columns, and
the last one served drops it. A slice called with another input (a model that
projects different tensors) recomputes: correct, only slower.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from shard.numerics.quantization import QuantizedWeight

log = logging.getLogger(__name__)

#: Attribute names of projections that transformers' decoders apply to one input.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Pending:
    """The fused product of the last input, until each slice has taken its share."""

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.served = 0


class SharedInputProjection(nn.Module):
    def __init__(self, fused: nn.Linear, widths: list[int]):
        super().__init__()
        self.fused = fused
        starts = [sum(widths[:i]) for i in range(len(widths))]
        self.bounds = [(start, start + width) for start, width in zip(starts, widths, strict=True)]
        self._pending = _Pending()

    def share(self, x: torch.Tensor, index: int) -> torch.Tensor:
        pending = self._pending
        if pending.input is not x:
            pending.input, pending.output, pending.served = x, self.fused(x), 0
        assert pending.output is not None
        start, end = self.bounds[index]
        out = pending.output[..., start:end]
        pending.served += 1
        if pending.served == len(self.bounds):
            pending.input = pending.output = None  # nothing outlives the layer's step
        return out


@dataclass
class _Owner:
    """A plain holder: the projection is registered once, under the parent module."""

    projection: SharedInputProjection


class SharedInputSlice(nn.Module):
    """Stands where one of the sibling projections was."""

    def __init__(self, owner: SharedInputProjection, index: int, in_features: int, out_features: int):
        super().__init__()
        self.owner = _Owner(owner)
        self.index = index
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner.projection.share(x, self.index)

    @property
    def weight(self) -> torch.Tensor:
        """Shape and dtype of the weight this slice stands for (a meta tensor: model code may read
        them, e.g. to pick a dtype; the values live in the fused projection)."""
        dtype = self.owner.projection.fused.weight.dtype
        return torch.empty(self.out_features, self.in_features, dtype=dtype, device="meta")

    def extra_repr(self) -> str:
        return f"slice {self.index} of a shared-input projection, in={self.in_features}, out={self.out_features}"


def _fusable(linears: list[nn.Module | None], stored: list[QuantizedWeight | None]) -> bool:
    """Plain ``nn.Linear`` layers (not already wrapped) of one input size, dtype and bias-ness, and
    one storage: all as loaded, or all quantized alike (a Q4_K_M file's Q6_K v beside its Q4_K q
    and k stays apart)."""
    first = linears[0]
    same_storage = all(s is None for s in stored) or all(
        s is not None and s.storage == stored[0].storage  # type: ignore[union-attr]
        for s in stored
    )
    return (
        isinstance(first, nn.Linear)
        and same_storage
        and all(
            type(m) is nn.Linear
            and m.in_features == first.in_features
            and m.weight.dtype == first.weight.dtype
            and (m.bias is None) == (first.bias is None)
            for m in linears
        )
    )


def _fuse(parent: nn.Module, names: tuple[str, ...], linears: list[nn.Linear]) -> str:
    """Returns the fused layer's name under ``parent``."""
    weight = torch.cat([m.weight.detach() for m in linears])
    # Built on the meta device, then given the concatenated tensors: no initialisation of
    # weights that would be overwritten (a start-up cost that grows with the model).
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    projection = SharedInputProjection(fused, [m.out_features for m in linears])
    parent.add_module("_".join(names), projection)
    for i, (name, linear) in enumerate(zip(names, linears, strict=True)):
        setattr(parent, name, SharedInputSlice(projection, i, linear.in_features, linear.out_features))
    return "_".join(names) + ".fused"


def fuse_shared_inputs(model: nn.Module, storage: dict[str, QuantizedWeight] | None = None) -> int:
    """Fuses every group of SIBLINGS found as plain ``nn.Linear`` of one module; returns how many groups.

    ``storage``: quantized weights by layer name (``shard.loading.gguf_storage``); siblings fuse only
    when stored alike, and their entries become one for the fused layer (rows concatenated)."""
    storage = {} if storage is None else storage
    fused = 0
    for parent_name, parent in list(model.named_modules()):
        prefix = f"{parent_name}." if parent_name else ""
        for names in SIBLINGS:
            linears = [getattr(parent, n, None) for n in names]
            stored = [storage.get(prefix + n) for n in names]
            if not _fusable(linears, stored):
                continue
            fused_name = prefix + _fuse(parent, names, linears)  # type: ignore[arg-type]
            if stored[0] is not None:
                storage[fused_name] = stored[0].concatenated(stored[1:])  # type: ignore[arg-type]
                for n in names:
                    del storage[prefix + n]
            fused += 1
    log.info("fused %d groups of projections that share their input", fused)
    return fused
