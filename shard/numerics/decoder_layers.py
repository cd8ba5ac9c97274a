"""Llama-family decoder layers in a dozen calls instead of about sixty.

Why: a decode step of one sequence is little arithmetic (SmolLM2-135M: a few ms of
matrix products stored as 4-bit), but transformers spells each layer with about sixty
torch operations and module calls (RMSNorm alone is seven, rotary embeddings ten),
each a few microseconds of dispatch: at 30 layers that was a third of the step.
``FastDecoderLayer`` runs the same layer as: norm, fused q/k/v product, rotary in
place, KV write, paged attention, output product, residual, norm, fused gate/up
product, activation, down product, residual. The norm, the rotary and silu(gate) * up
are C kernels (``shard/numerics/kernels/layer_ops.c``) whose result for a token depends only on
that token, like every other operation of the step, so a token keeps the same bits in a
prefill, a chunk or a decode step; the residual sums are taken as the linear kernel
stores the products (the bits of adding them after). Where every piece is the kernels'
own (the usual case on a CPU), the whole sequence runs as one C call
(``shard.numerics.native_layer``), the same kernels in the same order: the same bits without the
Python between the calls.

Only classes whose forward is known to be exactly this computation are replaced
(``LAYERS``); any other layer, and any model off the CPU, keeps transformers' code.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any, Literal

import torch
from torch import nn

from shard.numerics.attention import paged_attention_forward
from shard.numerics.invariant_linear import ACTIVATION_CODES as _TYPES
from shard.numerics.invariant_linear import InvariantLinear
from shard.numerics.kernels import load_library
from shard.numerics.lora import StepAdapters
from shard.numerics.lora import active as active_adapters
from shard.numerics.native_layer import NativeLayer, NativeStep, build
from shard.numerics.shared_input import SharedInputSlice

log = logging.getLogger(__name__)


def _llama_window(attention: Any) -> int | None:
    return None


def _mistral_window(attention: Any) -> int | None:
    return getattr(attention.config, "sliding_window", None)


def _qwen2_window(attention: Any) -> int | None:
    return attention.sliding_window


#: transformers decoder layers whose forward is the Llama computation, with the sliding
#: window their attention passes to the attention function.
LAYERS = {
    "LlamaDecoderLayer": _llama_window,
    "MistralDecoderLayer": _mistral_window,
    "Qwen2DecoderLayer": _qwen2_window,
}
#: Activation classes computing torch's silu: torch's own and transformers' (ACT2FN["silu"]).
SILU = {"SiLU", "SiLUActivation"}
#: Norm classes computing weight * (x * rsqrt(mean(x^2) + eps)) in float32, cast back first.
NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}


class LayerOps:
    """ctypes binding of layer_ops.c."""

    def __init__(self, library: ctypes.CDLL):
        pointer, size, count = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._norm = library.rms_norm
        self._norm.argtypes = [pointer, size, pointer, ctypes.c_float, pointer, size, size, size, count, count]
        self._rotary = library.rotary
        self._rotary.argtypes = [pointer, size, size, count, count, pointer, pointer, count, count]
        self._silu_mul = library.silu_mul
        self._silu_mul.argtypes = [pointer, size, size, size, pointer, count, count]
        self._norm.restype = self._rotary.restype = self._silu_mul.restype = None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [tokens, width] (rows may be strided); a new contiguous tensor."""
        out = torch.empty(x.shape, dtype=x.dtype)
        self._norm(
            x.data_ptr(), x.stride(0), weight.data_ptr(), eps, out.data_ptr(), out.stride(0),
            x.shape[0], x.shape[1], _TYPES[x.dtype], torch.get_num_threads(),
        )  # fmt: skip
        return out

    def silu_mul(self, product: torch.Tensor, width: int) -> torch.Tensor:
        """silu(product[:, :width]) * product[:, width:] for a fused gate/up product [tokens, 2 * width]."""
        out = torch.empty((product.shape[0], width), dtype=product.dtype)
        self._silu_mul(
            product.data_ptr(), product.stride(0), product.shape[0], width, out.data_ptr(), _TYPES[product.dtype],
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    def rotary(self, x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotates x [tokens, heads * head_dim] (rows may be strided, heads contiguous) in place."""
        self._rotary(
            x.data_ptr(), x.stride(0), x.shape[0], heads, head_dim, cos.data_ptr(), sin.data_ptr(),
            _TYPES[x.dtype], torch.get_num_threads(),
        )  # fmt: skip


@functools.cache
def layer_ops() -> LayerOps | None:
    library = load_library("layer_ops")
    return None if library is None else LayerOps(library)


class FastDecoderLayer(nn.Module):
    """A Llama-family decoder layer (``layer``'s own modules and weights), in fewer calls."""

    # transformers' modules, read by attribute (nn.Module's typing knows none of theirs).
    input_layernorm: Any
    self_attn: Any
    post_attention_layernorm: Any
    mlp: Any

    def __init__(self, layer: nn.Module, window: int | None):
        super().__init__()
        self.input_layernorm = layer.input_layernorm
        self.self_attn = layer.self_attn
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp
        self.window = window
        attention = self.self_attn
        self.head_dim = int(attention.head_dim)
        self.heads = attention.q_proj.out_features // self.head_dim
        self.kv_heads = attention.k_proj.out_features // self.head_dim
        # The fused products behind the slices (shard.numerics.shared_input), called directly: five
        # fewer module calls per layer. A tuple, so that nn.Module does not register them twice.
        self.qkv = _fused(attention, ("q_proj", "k_proj", "v_proj"))
        self.gate_up = _fused(self.mlp, ("gate_proj", "up_proj"))
        #: The gate's width where silu(gate) * up is one C call on the fused product (its two
        #: halves, SiLU activation); 0 where the torch operations run.
        self.silu_width = 0
        if self.gate_up and type(self.mlp.act_fn).__name__ in SILU:
            (g0, g1), (u0, u1) = self.gate_up[1]
            if g0 == 0 and u0 == g1 and u1 - u0 == g1:
                self.silu_width = g1
        self._native: NativeLayer | Literal[False] | None = None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None, **kwargs: Any) -> torch.Tensor:
        x = hidden_states[0]  # [tokens, hidden]: the engine packs a step into one row
        lora = active_adapters()  # each product gets its rows' adapter deltas (shard.numerics.lora)
        native = self.native_layer()
        step = native and NativeStep.of(kwargs.get("paged_step"), x, position_embeddings, native)
        if step:
            return step.forward(native, x).unsqueeze(0)  # type: ignore[arg-type]
        ops = layer_ops()
        assert ops is not None  # checked when the layer was installed
        attention = self.attention(ops, x, position_embeddings, kwargs, lora)
        x = _plus(self.self_attn.o_proj, attention, x)
        if lora:
            lora.add(self.index, ("self_attn.o_proj",), attention, x)
        h = self._norm(ops, self.post_attention_layernorm, x)
        activated = self.activated(ops, h, lora)
        x = _plus(self.mlp.down_proj, activated, x)
        if lora:
            lora.add(self.index, ("mlp.down_proj",), activated, x)
        return x.unsqueeze(0)

    @property
    def index(self) -> int:
        """This layer's index in the model: adapters' weights are keyed by it."""
        return int(getattr(self.self_attn, "layer_idx", 0) or 0)

    def native_layer(self) -> NativeLayer | None:
        """This layer for the one-call path (shard.numerics.native_layer), described on first use: the
        description holds addresses, so it is never saved with the module (``__getstate__``)."""
        if self._native is None:
            self._native = build(self) or False
        return self._native or None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {**state, "_native": None}

    def activated(self, ops: LayerOps, h: torch.Tensor, lora: StepAdapters | None = None) -> torch.Tensor:
        """act_fn(gate_proj(h)) * up_proj(h): the down projection's input."""
        mlp = self.mlp
        names = ("mlp.gate_proj", "mlp.up_proj")
        if self.gate_up and self.silu_width:
            return ops.silu_mul(self._product(self.gate_up, names, h, lora), self.silu_width)
        if self.gate_up:
            gate, up = _split(self.gate_up, self._product(self.gate_up, names, h, lora))
        else:
            gate, up = (self._projected(name, h, lora) for name in names)
        return mlp.act_fn(gate) * up

    def _product(
        self, fused: tuple[nn.Module, list[tuple[int, int]]], names: tuple[str, ...], h: torch.Tensor,
        lora: StepAdapters | None,
    ) -> torch.Tensor:  # fmt: skip
        """A fused product, each slice with the step's adapter deltas of its projection."""
        product = fused[0](h)
        if lora:
            lora.add(self.index, names, h, product, fused[1])
        return product

    def _projected(self, name: str, h: torch.Tensor, lora: StepAdapters | None) -> torch.Tensor:
        """A projection called on its own (not fused), with the step's adapter deltas."""
        out = self.get_submodule(name)(h)
        if lora:
            lora.add(self.index, (name,), h, out)
        return out

    def attention(
        self, ops: LayerOps, x: torch.Tensor, position_embeddings: Any, kwargs: dict, lora: StepAdapters | None = None
    ) -> torch.Tensor:
        """The attention block's output before o_proj: [tokens, heads * head_dim]."""
        attn, tokens, dim = self.self_attn, x.shape[0], self.head_dim
        h = self._norm(ops, self.input_layernorm, x)
        names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        if self.qkv:
            q, k, v = _split(self.qkv, self._product(self.qkv, names, h, lora))
        else:
            q, k, v = (self._projected(name, h, lora) for name in names)
        cos, sin = (t[0].contiguous() for t in position_embeddings)  # [tokens, head_dim]
        ops.rotary(q, self.heads, dim, cos, sin)
        ops.rotary(k, self.kv_heads, dim, cos, sin)
        out, _ = paged_attention_forward(
            attn,
            q.view(1, tokens, self.heads, dim).transpose(1, 2),
            k.view(1, tokens, self.kv_heads, dim).transpose(1, 2),
            v.view(1, tokens, self.kv_heads, dim).transpose(1, 2),
            None,
            scaling=attn.scaling,
            paged_step=kwargs.get("paged_step"),
            sliding_window=self.window,
        )
        return out[0].reshape(tokens, -1)

    @staticmethod
    def _norm(ops: LayerOps, norm: Any, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, norm.weight, float(norm.variance_epsilon))


def _fused(parent: nn.Module, names: tuple[str, ...]) -> tuple[nn.Module, list[tuple[int, int]]] | tuple[()]:
    """(the fused product, each slice's columns) when ``names`` are the slices of one shared-input
    projection, in order; () otherwise (the slices, or plain layers, are called)."""
    slices = [getattr(parent, name, None) for name in names]
    if not all(isinstance(s, SharedInputSlice) for s in slices):
        return ()
    owners = {id(s.owner.projection) for s in slices}  # type: ignore[union-attr]
    projection = slices[0].owner.projection  # type: ignore[union-attr]
    if len(owners) != 1 or [s.index for s in slices] != list(range(len(names))):  # type: ignore[union-attr]
        return ()
    return projection.fused, projection.bounds


def _plus(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + layer(x), the sum taken as the step-invariant kernel stores its results."""
    if isinstance(layer, InvariantLinear):
        return layer.plus(x, residual)
    return residual + layer(x)


def _split(fused: tuple[nn.Module, list[tuple[int, int]]], product: torch.Tensor) -> list[torch.Tensor]:
    """A fused product's slices, one per projection."""
    return [product[:, start:end] for start, end in fused[1]]


def _fits(layer: Any) -> bool:
    """The layer holds what FastDecoderLayer computes with, in a dtype the kernels take."""
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = [getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)]
    if attention is None or mlp is None or any(type(n).__name__ not in NORMS for n in norms):
        return False
    if any(getattr(attention, name, None) is not None for name in ("q_norm", "k_norm")):
        return False
    dtype = norms[0].weight.dtype  # type: ignore[union-attr]
    head_dim = getattr(attention, "head_dim", 0)
    return dtype in _TYPES and 0 < head_dim <= 1024 and head_dim % 2 == 0


def make_decoder_layers_fast(model: nn.Module) -> int:
    """Replaces the model's Llama-family decoder layers; returns how many (0 leaves it unchanged)."""
    if layer_ops() is None:
        return 0
    replaced = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.ModuleList):
            continue
        for index, layer in enumerate(module):
            window = LAYERS.get(type(layer).__name__)
            if window is not None and _fits(layer):
                module[index] = FastDecoderLayer(layer, window(layer.self_attn))
                replaced += 1
    if replaced:
        log.info("decoder layers: %d in the fused form (shard.numerics.decoder_layers)", replaced)
    return replaced
