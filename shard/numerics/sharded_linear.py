"""Tensor-parallel linear layers on the step-invariant kernel.

transformers shards a model's linears by its tensor-parallel plan (weights become
DTensors) and wraps each forward to move activations between ranks. For the
plan styles below the wrapped forward is, at inference, a local product plus at
most one collective; ``ShardedInvariantLinear`` does exactly that with the local
weight shard on ``shard/numerics/kernels/linear.c``:

- ``colwise``: weight split by output features; each rank's output is its slice.
- ``colwise_gather_output`` (the output head): the same, then the slices gathered.
- ``rowwise``: weight split by input features; each rank's partial product is
  summed across ranks (all-reduce), then the bias is added once.

The rule this gives: within one world size a token's logits do not depend on its
step (every local product is step-invariant, and an all-reduce of the same
partials adds them in the same order); across world sizes they differ in the last
bits, because a row-parallel product sums its input dimension in per-rank pieces.
Linears under other styles keep transformers' path, with a warning naming them.
"""

from __future__ import annotations

import logging
from fnmatch import fnmatch

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from shard.numerics.invariant_linear import InvariantLinear, LinearKernel, invariant_linear, linear_kernel

log = logging.getLogger(__name__)

STYLES = ("colwise", "colwise_gather_output", "rowwise")


class ShardedInvariantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, style: str, kernel: LinearKernel):
        super().__init__()
        weight = linear.weight
        if not isinstance(weight, DTensor):
            raise ValueError("a sharded linear needs a DTensor weight")
        expected = Shard(1) if style == "rowwise" else Shard(0)
        if weight.placements[0] != expected:
            raise ValueError(f"{style} expects its weight placed as {expected}, found {weight.placements}")
        self.style = style
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mesh = weight.device_mesh
        local = weight.to_local().detach()
        self.local_out = int(local.shape[0])
        self.register_buffer("packed", kernel.pack(local), persistent=False)
        self.weight = torch.empty_like(local, device="meta")  # shape and dtype of the local shard
        bias: torch.Tensor | None = linear.bias
        if isinstance(bias, DTensor):
            bias = bias.to_local()  # colwise: this rank's slice; rowwise: replicated, whole
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        bias: torch.Tensor | None = self._buffers["bias"]
        if self.style == "rowwise":
            partial = invariant_linear(flat, self.get_buffer("packed"), None, None, None, self.local_out)
            dist.all_reduce(partial, group=self.mesh.get_group())
            y = partial if bias is None else (partial.float() + bias).to(partial.dtype)
        else:
            y = invariant_linear(flat, self.get_buffer("packed"), None, None, bias, self.local_out)
            if self.style == "colwise_gather_output":
                y = self._gather(y)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        shape = torch.Size((*local.shape[:-1], self.out_features))
        stride = torch.empty(shape, device="meta").stride()
        sharded = DTensor.from_local(local, self.mesh, [Shard(-1)], run_check=False, shape=shape, stride=stride)
        return sharded.full_tensor()

    def extra_repr(self) -> str:
        return (
            f"{self.style}, in_features={self.in_features}, out_features={self.out_features} (local {self.local_out})"
        )


def plan_of(model: nn.Module) -> dict[str, str]:
    """The model's tensor-parallel plan as module-name patterns -> style names."""
    config = model.config.get_text_config()  # type: ignore[union-attr,operator]
    prefix = getattr(model, "base_model_prefix", "model")
    plan = {f"{prefix}.{pattern}": style for pattern, style in (config.base_model_tp_plan or {}).items()}
    plan.update(getattr(model, "_tp_plan", None) or {})
    return plan


def make_sharded_linears_invariant(model: nn.Module) -> int:
    """Replaces the plan's colwise/rowwise linears by ``ShardedInvariantLinear`` and unsharded ones by
    ``InvariantLinear``; returns how many."""
    kernel = linear_kernel()
    plan = plan_of(model)
    replaced, kept = 0, []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            qualified = f"{parent_name}.{name}" if parent_name else name
            style = next((s for pattern, s in plan.items() if fnmatch(qualified, pattern)), None)
            if style in STYLES and isinstance(child.weight, DTensor):
                setattr(parent, name, ShardedInvariantLinear(child, style, kernel))
                replaced += 1
            elif not isinstance(child.weight, DTensor):  # not sharded: every rank holds all of it
                setattr(parent, name, InvariantLinear(child, kernel))
                replaced += 1
            else:
                kept.append(f"{qualified} ({style or 'replicated'})")
    if kept:
        log.warning("not on the step-invariant kernel (their results may depend on the step): %s", ", ".join(kept))
    log.info("%d sharded linear layers on the step-invariant kernel", replaced)
    return replaced
