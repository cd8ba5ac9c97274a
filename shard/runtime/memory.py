"""How much memory the KV cache may take."""

from __future__ import annotations

from pathlib import Path

import torch


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return _mem_available_cpu()


def _mem_available_cpu() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def kv_budget_bytes(device: torch.device, fraction: float) -> int:
    """``fraction`` of the memory free now (after the weights are loaded)."""
    return int(available_bytes(device) * fraction)
