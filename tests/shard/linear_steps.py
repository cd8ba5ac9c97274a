"""A row computed alone and inside a larger step, for the linear kernel's step-invariance tests."""

from __future__ import annotations

from collections.abc import Callable

import torch


def alone_and_in_step(
    layer: Callable[[torch.Tensor], torch.Tensor], probe: torch.Tensor, others: torch.Tensor, where: int, threads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer(probe)``, and the probe's row of ``layer`` over ``others`` with the probe inserted at
    row ``where``, both computed with ``threads`` threads."""
    step = torch.cat([others[:where], probe, others[where:]])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return layer(probe), layer(step)[where : where + 1]
    finally:
        torch.set_num_threads(previous)
