"""Mixture-of-experts layers on the step-invariant kernel.

transformers' expert modules (Mixtral, Qwen2-MoE, ...) keep every expert's weights
in 3-D parameters and multiply the tokens routed to an expert with ``F.linear``, a
library GEMM whose rounding depends on how many tokens the expert got in this
step; their routers score tokens with ``F.linear`` too. Both become step-invariant:

- experts: registered in transformers' ``ExpertsInterface`` as ``switchyard_invariant``,
  the eager algorithm (experts in ascending order, each token's contributions added
  in that order) with each expert's products on ``shard/numerics/kernels/linear.c`` over
  weights packed once at load;
- routers (a module named ``*Router`` with a 2-D ``weight``): their ``F.linear`` on
  that weight is routed to the kernel while they run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from shard.numerics.invariant_linear import LinearKernel, invariant_linear, linear_kernel

log = logging.getLogger(__name__)

NAME = "switchyard_invariant"


class PackedExperts(nn.Module):
    """Every expert's gate/up and down weights in the kernel's tiles: [experts, tiles, in, tile]."""

    def __init__(self, experts: Any, kernel: LinearKernel):
        super().__init__()
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        if getattr(experts, "is_transposed", False):  # stored [experts, in, out]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        self.gate_up_out, self.down_out = int(gate_up.shape[1]), int(down.shape[1])
        self.register_buffer("gate_up", torch.stack([kernel.pack(w) for w in gate_up]), persistent=False)
        self.register_buffer("down", torch.stack([kernel.pack(w) for w in down]), persistent=False)
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            bias = getattr(experts, name, None)
            self.register_buffer(name, None if bias is None else bias.detach().float(), persistent=False)

    def gate_up_of(self, expert: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.get_buffer("gate_up")[expert], _bias(self.gate_up_proj_bias, expert)

    def down_of(self, expert: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.get_buffer("down")[expert], _bias(self.down_proj_bias, expert)


def invariant_experts_forward(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """hidden_states [tokens, hidden]; top_k_index/top_k_weights [tokens, k]."""
    packed: PackedExperts = self.switchyard_packed
    final = torch.zeros_like(hidden_states)
    for expert in sorted(set(top_k_index.flatten().tolist())):
        if not 0 <= expert < packed.get_buffer("gate_up").shape[0]:
            continue  # a masked slot (expert parallelism marks them with num_experts)
        token_idx, slot = torch.where(top_k_index == expert)
        weight, bias = packed.gate_up_of(expert)
        gate_up = invariant_linear(hidden_states[token_idx], weight, None, None, bias, packed.gate_up_out)
        hidden = self._apply_gate(gate_up) if getattr(self, "has_gate", True) else self.act_fn(gate_up)
        weight, bias = packed.down_of(expert)
        out = invariant_linear(hidden, weight, None, None, bias, packed.down_out)
        out = out * top_k_weights[token_idx, slot, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def _bias(biases: Any, expert: int) -> torch.Tensor | None:
    return None if biases is None else biases[expert]


class _RouterOnKernel(TorchFunctionMode):
    """While a router runs: ``F.linear`` with its weight goes to the kernel."""

    def __init__(self, weight: torch.Tensor, packed: torch.Tensor):
        super().__init__()
        self.weight, self.packed = weight, packed

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and args[1] is self.weight:
            x, bias = args[0], args[2] if len(args) > 2 else kwargs.get("bias")
            flat = x.reshape(-1, x.shape[-1])
            bias32 = None if bias is None else bias.float()
            y = invariant_linear(flat, self.packed, None, None, bias32, int(self.weight.shape[0]))
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return func(*args, **kwargs)


def _route_on_kernel(router: nn.Module, kernel: LinearKernel) -> None:
    weight: Any = router.weight
    mode = _RouterOnKernel(weight, kernel.pack(weight.detach()))

    def enter(module: nn.Module, args: Any) -> None:
        mode.__enter__()  # (a pre-hook's return value would replace the router's arguments)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        mode.__exit__(None, None, None)

    router.register_forward_pre_hook(enter)
    router.register_forward_hook(leave)


def make_experts_invariant(model: nn.Module) -> int:
    """Packs every expert module's weights and routes it and its router to the kernel; returns
    how many expert modules. A model without experts is left as it is."""
    experts = [m for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), nn.Parameter)]
    routers = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Router") and isinstance(getattr(m, "weight", None), nn.Parameter)
    ]
    if not experts and not routers:
        return 0
    kernel = linear_kernel()
    ALL_EXPERTS_FUNCTIONS.register(NAME, invariant_experts_forward)
    for module in experts:
        module.switchyard_packed = PackedExperts(module, kernel)
        module.config._experts_implementation = NAME  # type: ignore[union-attr]
        for name in ("gate_up_proj", "down_proj"):  # the packed copies replace them (shape and dtype kept)
            original = getattr(module, name)
            setattr(module, name, nn.Parameter(torch.empty_like(original, device="meta"), requires_grad=False))
    for router in routers:
        _route_on_kernel(router, kernel)
    log.info("%d expert modules and %d routers on the step-invariant kernel", len(experts), len(routers))
    return len(experts)
