"""Reading a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
for the served model, checked against it: every problem names the adapter and the module."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import grpc
import torch
from safetensors.torch import load_file
from torch import nn

from common.grpc_errors import ServiceError
from shard.numerics.lora import DTYPES, MAX_RANK, PROJECTIONS, Adapter, LoraWeights

#: A LoRA weight's key: ...layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>[.<adapter name>].weight
KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.((?:self_attn|mlp)\.\w+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ServiceError):
    """An adapter that does not fit the served model: INVALID_ARGUMENT."""

    code = grpc.StatusCode.INVALID_ARGUMENT


def load_adapter(name: str, folder: str, model: nn.Module) -> Adapter:
    """The adapter at ``folder``, in the model's dtype, on the step-invariant kernel."""
    path = Path(folder)
    config = _config(name, path)
    weights = _weights(name, path)
    layers = _decoder_layers(model)
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype not in DTYPES:
        raise AdapterError(f"adapter {name}: LoRA adapters are served on CPU shards in float32 or bfloat16 for now")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = KEY.search(key)
        if match is None:
            raise AdapterError(f"adapter {name}: {key} is not a LoRA weight of a decoder layer's projection")
        layer, projection, which = int(match[1]), match[2], match[3]
        pairs.setdefault((layer, projection), {})[which] = tensor
    adapter = Adapter(name)
    for (layer, projection), ab in sorted(pairs.items()):
        a, b = _checked(name, layer, projection, ab, layers)
        scale = _scale(config, projection, a.shape[0])
        adapter.modules[(layer, projection)] = LoraWeights.of(a, b, scale, parameter.dtype)
        adapter.rank = max(adapter.rank, a.shape[0])
    if not adapter.modules:
        raise AdapterError(f"adapter {name}: no LoRA weights in {path / 'adapter_model.safetensors'}")
    return adapter


def _config(name: str, path: Path) -> dict[str, Any]:
    file = path / "adapter_config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError as error:
        raise AdapterError(f"adapter {name}: {file} not found (a PEFT adapter folder is needed)") from error
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterError(f"adapter {name}: {file} is unreadable: {error}") from error
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name}: {file} is not a JSON object")
    kind = str(config.get("peft_type", "LORA")).upper()
    refusals = {
        kind != "LORA": f"it is a {kind} adapter, not LoRA",
        bool(config.get("use_dora")): "DoRA adapters are not served",
        bool(config.get("fan_in_fan_out")): "fan_in_fan_out (Conv1D) adapters are not served",
        config.get("bias", "none") != "none": f"bias={config.get('bias')!r} adapters are not served",
        bool(config.get("modules_to_save")): f"modules_to_save {config.get('modules_to_save')} are not served",
    }
    for refused, why in refusals.items():
        if refused:
            raise AdapterError(f"adapter {name}: {why}")
    return config


def _weights(name: str, path: Path) -> dict[str, torch.Tensor]:
    file = path / "adapter_model.safetensors"
    try:
        return load_file(str(file))
    except FileNotFoundError as error:
        raise AdapterError(f"adapter {name}: {file} not found") from error
    except Exception as error:  # safetensors raises its own error types for a damaged file
        raise AdapterError(f"adapter {name}: {file} is unreadable: {error}") from error


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    inner: Any = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise AdapterError("LoRA adapters need a model with decoder layers at model.layers")
    return list(layers)


def _checked(
    name: str, layer: int, projection: str, ab: dict[str, torch.Tensor], layers: list[nn.Module]
) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"adapter {name}: layers.{layer}.{projection}"
    if set(ab) != {"A", "B"}:
        raise AdapterError(f"{where} has lora_{'A' if 'A' in ab else 'B'} without its pair")
    if not 0 <= layer < len(layers):
        raise AdapterError(f"{where}: the model has {len(layers)} layers")
    if projection not in PROJECTIONS:
        raise AdapterError(f"{where}: not a projection this server adapts ({', '.join(PROJECTIONS)})")
    try:
        module = layers[layer].get_submodule(projection)
    except AttributeError as error:
        raise AdapterError(f"{where}: the model has no such module") from error
    a, b = ab["A"], ab["B"]
    if a.shape[0] > MAX_RANK:
        raise AdapterError(f"{where}: rank {a.shape[0]} is above the largest served, {MAX_RANK}")
    in_features, out_features = int(module.in_features), int(module.out_features)  # type: ignore[arg-type]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not chain")
    if a.shape[1] != in_features or b.shape[0] != out_features:
        raise AdapterError(
            f"{where}: shapes lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} do not fit the model's "
            f"{in_features} -> {out_features} projection (an adapter for another base model?)"
        )
    return a, b


def _scale(config: dict[str, Any], projection: str, rank: int) -> float:
    """lora_alpha / rank, or / sqrt(rank) with rsLoRA; alpha_pattern overrides alpha per module."""
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(pattern, projection):
            alpha = float(value)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
