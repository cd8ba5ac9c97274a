"""LoRA adapters' deltas, added to the rows of one step that use each adapter.

A LoRA adapter changes a linear layer ``y = W x`` into ``y = W x + scale * B (A x)``. A step
mixes requests of several adapters and of the base model, so the base product is computed
for every row as it is without adapters (the same calls, the same bits), and each adapter
then adds its delta to its own rows only: ``out[rows] += B' (A x[rows])``, with the scale
folded into ``B'``. Both products run on the step-invariant linear kernel, so a row's delta
does not depend on how many rows share the product. A request's tokens are then the same
whatever adapters, if any, its companions use (tests/shard/test_lora.py).

The engine says which rows use which adapter for the step in flight (``adapting``). Layers
in the fused form (shard.numerics.decoder_layers) add the deltas where they compute each
projection, and take their Python path while a step has adapter rows: the one-call C path
has no place for them, and it gives the same bits as the Python path. Other layers get
forward hooks on their projections (``hook_projections``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from shard.numerics.invariant_linear import InvariantLinear, linear_kernel

#: The projections an adapter may target, by their names inside a decoder layer.
PROJECTIONS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip


@dataclass
class LoraPair:
    """One adapted projection: ``down`` is A (in -> rank), ``up`` is B times the scale (rank -> out)."""

    down: InvariantLinear
    up: InvariantLinear

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> LoraPair:
        kernel = linear_kernel()
        return cls(_invariant(a, dtype, kernel), _invariant(b.float() * scale, dtype, kernel))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in (self.down, self.up) for t in m.buffers())


def _invariant(weight: torch.Tensor, dtype: torch.dtype, kernel) -> InvariantLinear:  # type: ignore[no-untyped-def]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
    return InvariantLinear(linear, kernel)


@dataclass
class Adapter:
    name: str
    #: (layer index, projection name) -> its pair.
    modules: dict[tuple[int, str], LoraPair] = field(default_factory=dict)
    rank: int = 0

    @property
    def nbytes(self) -> int:
        return sum(pair.nbytes for pair in self.modules.values())


@dataclass
class StepAdapters:
    """Which rows of the step in flight use which adapter."""

    groups: list[tuple[Adapter, torch.Tensor]]

    def add(
        self, layer: int, projection: str, x: torch.Tensor, out: torch.Tensor, columns: tuple[int, int] | None = None
    ) -> None:
        """``out[rows, columns] += delta(x[rows])`` for each adapter of the step that adapts
        ``projection`` of ``layer``; x and out are [tokens, features] (columns: all by default)."""
        for adapter, rows in self.groups:
            pair = adapter.modules.get((layer, projection))
            if pair is None:
                continue
            start, end = columns or (0, out.shape[1])
            target = out[rows, start:end]
            out[rows, start:end] = pair.up.plus(pair.down(x[rows]), target.contiguous())


_active: StepAdapters | None = None


@contextmanager
def adapting(adapters: StepAdapters | None) -> Iterator[None]:
    """The adapters of the forward run inside (None: the base model for every row)."""
    global _active
    _active = adapters
    try:
        yield
    finally:
        _active = None


def active() -> StepAdapters | None:
    return _active


def hook_projections(layer: nn.Module, index: int) -> int:
    """Forward hooks adding the active adapters' deltas to a decoder layer that is not in the
    fused form; returns how many projections were hooked."""
    hooked = 0
    for name in PROJECTIONS:
        module = layer.get_submodule(name) if _has(layer, name) else None
        if module is None:
            continue

        def hook(module: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> torch.Tensor:
            step = _active
            if step is None:
                return out
            x = args[0]
            flat_out = out.reshape(-1, out.shape[-1]).clone()
            step.add(index, name, x.reshape(-1, x.shape[-1]), flat_out)
            return flat_out.reshape(out.shape)

        module.register_forward_hook(hook)
        hooked += 1
    return hooked


def _has(layer: nn.Module, name: str) -> bool:
    try:
        layer.get_submodule(name)
    except AttributeError:
        return False
    return True
