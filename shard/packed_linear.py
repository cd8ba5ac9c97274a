"""bf16 linear layers on CPU with their weights prepacked once for oneDNN.

Why: ``F.linear`` on a bf16 CPU tensor hands oneDNN a plain [out, in] weight,
and oneDNN reorders it into its blocked layout on every call. At decode sizes
(9-64 rows) that reorder costs as much as the product. Packing each weight once
at load time removes it: measured on this machine, SmolLM2's 30 layers at 16
rows 18.2 -> 12.9 ms, its 576x49152 output head 2.4 -> 1.4 ms (weights cold in
cache, as in a real step). inductor does the same packing under ``freezing``,
but only for weights it can treat as constants, which parameters of a model
compiled with dynamic shapes are not; so the packing is done here, for eager
and compiled steps alike.

The packed weight replaces the plain one (no second copy). A packed layer's
``weight`` is a meta tensor of the original shape and dtype: model code that
reads its dtype or shape still works, code that would compute with it fails
loudly instead of using stale values.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Rows oneDNN is told to expect when choosing the packed layout (any row count works).
_ROWS_HINT = 16


# Defined with torch.library.Library rather than @custom_op: a call costs ~2 us over the
# oneDNN call itself instead of ~5 us, and a step makes one per linear layer (200+).
# A custom op at all so that inductor keeps the call as it is: its own linear
# fusions expect weights it packed itself.
_LIBRARY = torch.library.Library("switchyard", "FRAGMENT")
_LIBRARY.define("packed_linear(Tensor x, Tensor packed, Tensor? bias, SymInt out_features) -> Tensor")


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``x @ W.T + bias`` for a 2-d ``x``, with W packed by ``torch.ops.mkldnn._reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packed_linear_fake(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


_LIBRARY.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")
torch.library.register_fake("switchyard::packed_linear", _packed_linear_fake, lib=_LIBRARY)
packed_linear = torch.ops.switchyard.packed_linear.default


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight lives in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT), persistent=False)
        self.weight = torch.empty_like(weight, device="meta")  # shape and dtype only (see the module doc)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = packed_linear(flat, self.get_buffer("packed"), self.bias, self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(dtype: torch.dtype, device: torch.device, world_size: int) -> bool:
    """CPU, bf16, one shard (tensor-parallel layers carry transformers' sharding hooks), oneDNN with bf16."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and world_size == 1
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def pack_linears(model: nn.Module) -> int:
    """Replaces every bf16 ``nn.Linear`` of ``model`` by a ``PackedLinear``; returns how many."""
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, PackedLinear(child))
                packed += 1
    log.info("prepacked %d bf16 linear layers for oneDNN", packed)
    return packed
