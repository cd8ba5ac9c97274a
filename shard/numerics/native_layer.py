"""A fused decoder layer in one C call (``shard/numerics/kernels/decoder_layer.c``).

Why: ``FastDecoderLayer`` already computes a layer in a dozen kernel calls, but each costs
Python, ctypes and tensor bookkeeping around the kernel, as much as all of a small model's
matrix products at one sequence (docs/performance.md, "Fewer calls per layer and per step").
``decoder_layer.c`` makes the same calls in the same order on the same buffers (the same
bits, tested), from C. What stays from step to step (weights, shapes) is described once per
layer (``NativeLayer``); what a step shares across its layers (slots, block tables, rotary
tables, scratch buffers) once per step (``NativeStep``, kept on the ``PagedStep``). Where the
model forward is ours (``shard.numerics.model_forward``), the whole stack of layers is one call
(``NativeStack``), without the Python between the layers.

It applies where every piece is the kernels' own: fused q/k/v and gate/up products on the
step-invariant linear kernel, silu, the CPU paged attention for every query, activations,
norm weights and KV cache in one dtype. Anything else keeps the Python path (``build``
and ``NativeStep.of`` return None).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

from shard.numerics.attention import PagedStep, cpu_paged
from shard.numerics.invariant_linear import ACTIVATION_CODES as TYPES
from shard.numerics.invariant_linear import InvariantLinear
from shard.numerics.kernels import load_library
from shard.numerics.lora import active as active_adapters

_pointer, _int, _int64, _float = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float


class _Kernels(ctypes.Structure):
    _fields_ = [("linear", _pointer), ("rms_norm", _pointer), ("rotary", _pointer), ("silu_mul", _pointer),
                ("attention", _pointer), ("lora", _pointer)]  # fmt: skip


class _Linear(ctypes.Structure):
    _fields_ = [("packed", _pointer), ("scales", _pointer), ("offsets", _pointer), ("bias", _pointer),
                ("wtype", _int), ("in_features", _int64), ("out_features", _int64)]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _pointer), ("post_norm", _pointer), ("input_eps", _float), ("post_eps", _float),
        ("scale", _float), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
        ("layer", _int), ("heads", _int), ("kv_heads", _int), ("head_dim", _int), ("window", _int),
        ("hidden", _int64), ("intermediate", _int64),
    ]  # fmt: skip


class _Step(ctypes.Structure):
    _fields_ = [
        ("kernels", ctypes.POINTER(_Kernels)), ("tokens", _int64), ("type", _int), ("threads", _int),
        ("slots", _pointer), ("tables", _pointer), ("context_len", _pointer), ("max_blocks", _int),
        ("block_size", _int), ("keys", _pointer), ("values", _pointer), ("cos", _pointer), ("sin", _pointer),
        ("normed", _pointer), ("qkv", _pointer), ("q", _pointer), ("attention", _pointer), ("gate_up", _pointer),
        ("activated", _pointer), ("lora_slot", _pointer), ("lora_slots", ctypes.c_int32),
        ("lora_layers", ctypes.c_int32), ("lora", _pointer),
    ]  # fmt: skip


class _Library:
    """The driver and the kernels it calls, one ``Kernels`` table per activation type."""

    def __init__(
        self, driver: ctypes.CDLL, linear: ctypes.CDLL, ops: ctypes.CDLL, attention: ctypes.CDLL, lora: ctypes.CDLL
    ):
        self.run = driver.decoder_layer
        self.run.restype = ctypes.c_int
        self.run.argtypes = [ctypes.POINTER(_Layer), ctypes.POINTER(_Step), _pointer, _pointer]
        self.run_stack = driver.decoder_layers
        self.run_stack.restype = ctypes.c_int
        self.run_stack.argtypes = [
            ctypes.POINTER(ctypes.POINTER(_Layer)),
            _int,
            ctypes.POINTER(_Step),
            _pointer,
            _pointer,
            _pointer,
        ]

        def address(function: Any) -> int:
            return ctypes.cast(function, _pointer).value or 0

        shared = [address(f) for f in (linear.invariant_linear, ops.rms_norm, ops.rotary, ops.silu_mul)]
        self.kernels = {
            torch.float32: _Kernels(*shared, address(attention.paged_decode_f32), address(lora.lora_add)),
            torch.bfloat16: _Kernels(*shared, address(attention.paged_decode_bf16), address(lora.lora_add)),
        }


@functools.cache
def _library() -> _Library | None:
    libraries = [load_library(name) for name in ("decoder_layer", "linear", "layer_ops", "paged_decode", "lora")]
    if any(library is None for library in libraries):
        return None
    return _Library(*libraries)  # type: ignore[arg-type]


def _linear(layer: Any) -> _Linear | None:
    if type(layer) is not InvariantLinear:  # a tensor-parallel or other wrapper: not ours to bypass
        return None
    buffers = layer._buffers

    def address(name: str) -> int | None:
        tensor = buffers[name]
        return None if tensor is None else tensor.data_ptr()

    packed: torch.Tensor = buffers["packed"]  # type: ignore[assignment]
    return _Linear(
        packed.data_ptr(), address("scales"), address("offsets"), address("bias"), layer.wtype,
        layer.in_features, layer.out_features,
    )  # fmt: skip


class NativeLayer:
    """One layer's weights and shapes for the driver; holds the module so its tensors stay alive."""

    def __init__(self, struct: _Layer, dtype: torch.dtype, module: Any):
        self.struct = struct
        self.dtype = dtype
        self.module = module
        self.widths = (struct.hidden, struct.qkv.out_features, struct.heads * struct.head_dim, struct.intermediate)


def build(layer: Any) -> NativeLayer | None:
    """``layer`` (a FastDecoderLayer) for the driver, or None where it does not fit."""
    if _library() is None or not (layer.qkv and layer.gate_up and layer.silu_width):
        return None
    attention, norms = layer.self_attn, (layer.input_layernorm, layer.post_attention_layernorm)
    found = [_linear(m) for m in (layer.qkv[0], attention.o_proj, layer.gate_up[0], layer.mlp.down_proj)]
    linears = [w for w in found if w is not None]
    dtype = norms[0].weight.dtype
    if len(linears) < 4 or dtype not in TYPES or norms[1].weight.dtype != dtype:
        return None
    qkv, o, gate_up, down = linears
    hidden, width = norms[0].weight.shape[0], layer.silu_width
    heads_width = layer.heads * layer.head_dim
    if (qkv.in_features, o.in_features, o.out_features, down.out_features) != (hidden, heads_width, hidden, hidden):
        return None
    if gate_up.out_features != 2 * width or down.in_features != width:
        return None
    struct = _Layer(
        norms[0].weight.data_ptr(), norms[1].weight.data_ptr(), float(norms[0].variance_epsilon),
        float(norms[1].variance_epsilon), float(attention.scaling), qkv, o, gate_up, down, int(attention.layer_idx),
        layer.heads, layer.kv_heads, layer.head_dim, layer.window or 0, hidden, width,
    )  # fmt: skip
    return NativeLayer(struct, dtype, layer)


class NativeStep:
    """A step's share of every layer's call: built by the first layer, used by all."""

    def __init__(self, library: _Library, paged_step: PagedStep, x: torch.Tensor, rotary: Any, widths: tuple):
        cache, tokens = paged_step.cache, x.shape[0]
        hidden, qkv_width, heads_width, intermediate = widths
        tables, context_len = _per_query_tables(paged_step)
        cos, sin = (t[0].contiguous() for t in rotary)
        keys, values = cache.addresses
        # normed, qkv, q, attention, gate_up, activated (decoder_layer.c's Step)
        scratch = [
            torch.empty((tokens, width), dtype=x.dtype)
            for width in (hidden, qkv_width, heads_width, heads_width, 2 * intermediate, intermediate)
        ]
        self.widths = widths
        self.dtype = x.dtype
        # Every tensor the struct points into, kept alive for the step.
        self._keep = [paged_step.slots, tables, context_len, keys, values, cos, sin, *scratch]
        self.kernels = library.kernels[x.dtype]
        self.struct = _Step(
            ctypes.pointer(self.kernels), tokens, TYPES[x.dtype], torch.get_num_threads(),
            paged_step.slots.data_ptr(), tables.data_ptr(), context_len.data_ptr(), tables.shape[1],
            cache.block_size, keys.data_ptr(), values.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            *(t.data_ptr() for t in scratch),
        )  # fmt: skip
        self._adapt(widths)
        self.run = library.run

    def _adapt(self, widths: tuple) -> None:
        """The step's LoRA adapters (shard.numerics.lora), if any, into the struct: each product
        gets its rows' deltas as on the Python path."""
        adapters = active_adapters()
        if adapters is None:
            return
        hidden, qkv_width, heads_width, intermediate = widths
        kv = (qkv_width - heads_width) // 2
        spans = (
            ((0, heads_width), (heads_width, heads_width + kv), (heads_width + kv, qkv_width)), ((0, hidden),),
            ((0, intermediate), (intermediate, 2 * intermediate)), ((0, hidden),),
        )  # fmt: skip
        layers, table, keep = adapters.native_groups(spans)
        self._keep += [adapters.slot_of_row, table, keep]
        self.struct.lora_slot = adapters.slot_of_row.data_ptr()
        self.struct.lora_slots = len(adapters.adapters)
        self.struct.lora_layers = layers
        self.struct.lora = ctypes.addressof(table)

    @staticmethod
    def of(paged_step: PagedStep | None, x: torch.Tensor, rotary: Any, layer: NativeLayer) -> NativeStep | None:
        """The step's, built on first use; None where the step is not the driver's to run."""
        if paged_step is None:
            return None
        native = paged_step.native
        if native is None:
            library = _library()
            if library is None or not _fits(paged_step, x, rotary, layer.dtype):
                paged_step.native = False
                return None
            native = paged_step.native = NativeStep(library, paged_step, x, rotary, layer.widths)
        if native is False or native.widths != layer.widths or native.dtype != x.dtype:
            return None
        return native

    def forward(self, layer: NativeLayer, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        _check(self.run(ctypes.byref(layer.struct), ctypes.byref(self.struct), x.data_ptr(), out.data_ptr()))
        return out


class NativeStack:
    """A model's decoder layers for one driver call a step (``decoder_layers``), where every layer
    has the one-call path with the same shapes: the per-layer calls without Python between them."""

    def __init__(self, library: _Library, layers: list[NativeLayer]):
        self.layers = layers  # holds the structs the table points at
        self._table = (ctypes.POINTER(_Layer) * len(layers))(*(ctypes.pointer(layer.struct) for layer in layers))
        self._run = library.run_stack

    @property
    def first(self) -> NativeLayer:
        """The layer whose shapes every layer shares (what ``NativeStep.of`` checks a step against)."""
        return self.layers[0]

    @classmethod
    def of(cls, layers: list[NativeLayer | None]) -> NativeStack | None:
        library = _library()
        if library is None or not layers:
            return None
        first = layers[0]
        if first is None or any(x is None or (x.widths, x.dtype) != (first.widths, first.dtype) for x in layers):
            return None
        return cls(library, layers)  # type: ignore[arg-type]  # None excluded above

    def forward(self, step: NativeStep, x: torch.Tensor) -> torch.Tensor:
        """Every layer on x [tokens, hidden] (``step`` from ``NativeStep.of`` with ``first``)."""
        out = torch.empty_like(x)
        spare = torch.empty_like(x) if len(self.layers) > 1 else out
        _check(
            self._run(
                self._table, len(self.layers), ctypes.byref(step.struct), x.data_ptr(), out.data_ptr(), spare.data_ptr()
            )
        )
        return out


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError(f"the decoder layer kernel failed with status {status}")


def _fits(paged_step: PagedStep, x: torch.Tensor, rotary: Any, dtype: torch.dtype) -> bool:
    cache = paged_step.cache
    backends = (paged_step.decode_attention, paged_step.prefill_attention)
    return (
        all(b is cpu_paged.attend for b in backends)
        and x.device.type == "cpu"
        and x.is_contiguous()
        and x.dtype == dtype == cache.layout.dtype
        and all(t.dtype == dtype for t in rotary)
        and x.shape[0] == paged_step.num_tokens
    )


def _per_query_tables(paged_step: PagedStep) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query's block table row and context length, in the step's packed order (one
    attention call for the step's groups; each query's result depends only on its own row)."""
    groups = paged_step.groups
    if len(groups) == 1 and groups[0].packed_rows.shape[0] == paged_step.num_tokens:
        tables, context_len = groups[0].per_query()
        return tables.contiguous(), context_len.contiguous()
    parts = [(g.packed_rows, *g.per_query()) for g in groups]
    width = max(tables.shape[1] for _, tables, _ in parts)
    tables = torch.zeros((paged_step.num_tokens, width), dtype=torch.long)
    context_len = torch.zeros(paged_step.num_tokens, dtype=torch.long)
    for rows, group_tables, group_context in parts:
        tables[rows, : group_tables.shape[1]] = group_tables
        context_len[rows] = group_context
    return tables, context_len
