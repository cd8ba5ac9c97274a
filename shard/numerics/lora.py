"""LoRA adapters' deltas, added to the rows of one step that use each adapter.

A LoRA adapter changes a linear layer ``y = W x`` into ``y = W x + scale * B (A x)``. A step
mixes requests of several adapters and of the base model, so the base product is computed
for every row as it is without adapters (the same calls, the same bits), and then each row
gets its own adapter's delta, nothing for a base row (``kernels/lora.c``). One kernel call
covers a group of projections that share an input (q/k/v, gate/up) for every adapter of
the step. A row's delta is computed from that row and its adapter alone, in a fixed order,
so a request's tokens are the same whatever adapters its companions use
(tests/shard/test_lora.py).

The engine says which rows use which adapter for the step in flight (``adapting``). Layers
in the fused form (shard.numerics.decoder_layers) add the deltas where they compute each
projection, and take their Python path while a step has adapter rows: the one-call C path
has no place for them, and it gives the same bits as the Python path. Other layers get
forward hooks on their projections (``hook_projections``).
"""

from __future__ import annotations

import ctypes
import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shard.numerics.kernels import load_library

#: The projections an adapter may target, by their names inside a decoder layer.
PROJECTIONS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip
#: The kernel's largest rank (kernels/lora.c, MAX_RANK).
MAX_RANK = 512
DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class LoraWeights:
    """One adapted projection in the model's dtype (the kernel reads the weights in the type of
    the activations): A [rank, in], and B [out, rank] times the scale, stored transposed
    ([rank, out]: the kernel runs along the output columns). bf16 halves what a step reads."""

    a: torch.Tensor
    b: torch.Tensor

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> LoraWeights:
        return cls(a.to(dtype).contiguous(), (b.float() * scale).t().to(dtype).contiguous())

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def nbytes(self) -> int:
        return (self.a.numel() + self.b.numel()) * self.a.element_size()


@dataclass(eq=False)  # compared and hashed by identity: a step's tables are cached per adapter object
class Adapter:
    name: str
    #: (layer index, projection name) -> its weights.
    modules: dict[tuple[int, str], LoraWeights] = field(default_factory=dict)
    rank: int = 0

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.modules.values())


class _Kernel:
    def __init__(self, library: ctypes.CDLL):
        self.functions = {torch.float32: library.lora_add_f32, torch.bfloat16: library.lora_add_bf16}
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        for function in self.functions.values():
            function.restype = ctypes.c_int
            function.argtypes = [p, i64, p, i64, i64, i64, p, ctypes.c_int32, ctypes.c_int32, p, p, p, p, ctypes.c_int]


@functools.cache
def _kernel() -> _Kernel:
    library = load_library("lora")
    if library is None:
        raise RuntimeError("the LoRA kernel could not be built (a C compiler is needed)")
    return _Kernel(library)


@dataclass
class _Tables:
    """The kernel's per-(adapter, projection) tables for one group of one layer."""

    a: ctypes.Array
    b: ctypes.Array
    rank: ctypes.Array
    #: Kept alive while the tables point at them.
    weights: list[LoraWeights]


class _Recent:
    """What was built for recent sets of a step's adapters (the key starts with the set): a steady
    load reuses it every step. The entries of an adapter go when it is unloaded (``forget``), so
    the cache never keeps an unloaded adapter's weights alive."""

    def __init__(self, kept: int):
        self.kept = kept
        self.entries: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = self.entries[key] = make()
        if len(self.entries) > self.kept:
            self.entries.popitem(last=False)
        return value

    def forget(self, adapter: Adapter) -> None:
        for key in [k for k in self.entries if adapter in k[0]]:
            del self.entries[key]


#: Per (adapters of a step, layer, group); per (adapters of a step, the groups' columns).
_TABLES, _NATIVE = _Recent(4096), _Recent(64)


def forget(adapter: Adapter) -> None:
    """Drops what was built for steps with ``adapter`` (it is being unloaded or replaced)."""
    _TABLES.forget(adapter)
    _NATIVE.forget(adapter)


def _tables(adapters: tuple[Adapter, ...], layer: int, names: tuple[str, ...]) -> _Tables | None:
    return _TABLES.get((adapters, layer, names), lambda: _build_tables(adapters, layer, names))


def _build_tables(adapters: tuple[Adapter, ...], layer: int, names: tuple[str, ...]) -> _Tables | None:
    entries = [adapter.modules.get((layer, name)) for adapter in adapters for name in names]
    found = [w for w in entries if w is not None]
    if not found:
        return None
    count = len(entries)
    return _Tables(
        (ctypes.c_void_p * count)(*[w.a.data_ptr() if w else None for w in entries]),
        (ctypes.c_void_p * count)(*[w.b.data_ptr() if w else None for w in entries]),
        (ctypes.c_int32 * count)(*[w.rank if w else 0 for w in entries]),
        found,
    )


#: The groups of projections that share an input, in the order decoder_layer.c adds them.
GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",),
)  # fmt: skip


class NativeGroup(ctypes.Structure):
    """decoder_layer.c's LoraGroup."""

    _fields_ = [("a", ctypes.c_void_p), ("bt", ctypes.c_void_p), ("rank", ctypes.c_void_p),
                ("columns", ctypes.c_void_p), ("projections", ctypes.c_int32)]  # fmt: skip


class StepAdapters:
    """Which rows of the step in flight use which adapter."""

    def __init__(self, adapters: list[Adapter], slot_of_row: torch.Tensor):
        self.adapters = tuple(adapters)
        #: Per row of the packed step: its adapter's index in ``adapters``, -1 for none (int32).
        self.slot_of_row = slot_of_row.to(torch.int32).contiguous()

    def add(
        self,
        layer: int,
        names: tuple[str, ...],
        x: torch.Tensor,
        out: torch.Tensor,
        columns: list[tuple[int, int]] | None = None,
    ) -> None:
        """``out[r, columns of p] += delta_p(x[r])`` in place, for each projection p of ``names``
        (of ``layer``) that row r's adapter adapts; x [tokens, in] and out [tokens, *] have
        unit column stride (columns: p's (start, end) in out; one projection: all of out)."""
        tables = _tables(self.adapters, layer, names)
        if tables is None:
            return
        if x.stride(1) != 1 or out.stride(1) != 1 or x.dtype != out.dtype or x.dtype != tables.weights[0].a.dtype:
            raise ValueError("LoRA deltas need rows of unit column stride in the adapters' dtype")
        flat = _columns(tuple(columns) if columns else ((0, out.shape[1]),))
        status = _kernel().functions[x.dtype](
            x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), x.shape[0], x.shape[1],
            self.slot_of_row.data_ptr(), len(self.adapters), len(names), flat, tables.a, tables.b, tables.rank,
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"the LoRA kernel refused a rank above {MAX_RANK}")

    def native_groups(self, spans: tuple[tuple[tuple[int, int], ...], ...]) -> tuple[int, ctypes.Array, list]:
        """decoder_layer.c's table: for each layer an adapter of the step adapts, its four
        ``GROUPS`` (``spans``: each group's columns in its product, the same in every layer).
        Returns (layers covered, the table, what it points into, to keep alive)."""
        return _NATIVE.get((self.adapters, spans), lambda: self._build_native_groups(spans))

    def _build_native_groups(self, spans: tuple[tuple[tuple[int, int], ...], ...]) -> tuple[int, ctypes.Array, list]:
        layers = 1 + max((layer for a in self.adapters for layer, _ in a.modules), default=-1)
        table = (NativeGroup * (4 * layers))()
        keep: list = []
        for layer in range(layers):
            for g, (names, columns) in enumerate(zip(GROUPS, spans, strict=True)):
                tables = _tables(self.adapters, layer, names)
                if tables is not None:
                    flat = _columns(columns)
                    table[4 * layer + g] = NativeGroup(
                        ctypes.addressof(tables.a), ctypes.addressof(tables.b), ctypes.addressof(tables.rank),
                        ctypes.addressof(flat), len(names),
                    )  # fmt: skip
                    keep += [tables, flat]
        return layers, table, keep


@functools.lru_cache(maxsize=1024)
def _columns(spans: tuple[tuple[int, int], ...]) -> ctypes.Array:
    """The kernel's (start, width) pairs of a group's projections (a layer's are the same every step)."""
    return (ctypes.c_int64 * (2 * len(spans)))(*[v for start, end in spans for v in (start, end - start)])


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
        try:
            module = layer.get_submodule(name)
        except AttributeError:
            continue

        def hook(module: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> torch.Tensor:
            step = _active
            if step is None:
                return out
            x = args[0].reshape(-1, args[0].shape[-1]).contiguous()
            flat_out = out.reshape(-1, out.shape[-1]).clone()  # a slice of a shared product stays untouched
            step.add(index, (name,), x, flat_out)
            return flat_out.reshape(out.shape)

        module.register_forward_hook(hook)
        hooked += 1
    return hooked
