"""A GGUF checkpoint's quantized layers taken from the file's own blocks.

Which file tensor is which parameter, and the order or transformation transformers
gives it (llama's q/k projections are stored with their rows permuted), come from
transformers' own GGUF mapping and processors, so the two cannot disagree. A file
whose parameters are one tensor each is loaded directly (``load_direct``): the model
is built on the meta device, its float tensors are de-quantized as transformers does,
and its quantized layers and token table are taken as blocks (``shard.loading.gguf_blocks``)
and never materialized. Other files (stacked MoE experts) are loaded by transformers,
and their layers' blocks are checked against the weights it loaded
(``gguf_linear_storage``): equal, or the start fails.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, cast

import gguf
import numpy as np
import torch
from torch import nn
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

from shard.loading.gguf_blocks import FLOAT_TYPES, UnsupportedType, check_supported, decode
from shard.numerics.quantization import QuantizedWeight

log = logging.getLogger(__name__)


def check_types(reader: gguf.GGUFReader) -> None:
    """UnsupportedType for the first tensor of a quantized type not stored as it is."""
    for tensor in reader.tensors:
        check_supported(tensor.tensor_type, tensor.name)


class _Mapping:
    """A GGUF file's tensors as the parameters of ``model``, transformers' processor for them, and
    the blocks decoded so far (by tensor: a tied head and its embedding share one)."""

    def __init__(self, model: nn.Module, reader: gguf.GGUFReader):
        self.tensors = {t.name: t for t in reader.tensors}
        architecture = read_field(reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=_text_config(model))
        self.name_map = _name_map(model)
        get_input = getattr(model, "get_input_embeddings", None)
        self.embedding = get_input() if callable(get_input) else None
        self.decoded: dict[str, QuantizedWeight] = {}

    def tensor(self, module_name: str, param_name: str) -> Any:
        return self.tensors.get(f"{_gguf_name(self.name_map, module_name)}.{param_name}")

    def blocks(self, tensor: Any, shape: tuple[int, ...]) -> QuantizedWeight | None:
        """A weight's blocks in transformers' row order, decoded once; None where transformers
        does more than reorder its rows."""
        if tensor.name not in self.decoded:
            weight = _blocks(tensor, shape, self.processor)
            if weight is None:
                return None
            self.decoded[tensor.name] = weight
        return self.decoded[tensor.name]

    def log_stored(self, layers: int, detail: str = "") -> None:
        stored_types = Counter(self.tensors[name].tensor_type.name for name in self.decoded)
        log.info(
            "GGUF blocks kept as stored for %d layers (%s)%s",
            layers,
            ", ".join(f"{count} {name}" for name, count in sorted(stored_types.items())),
            detail,
        )


def gguf_linear_storage(model: nn.Module, reader: gguf.GGUFReader) -> dict[str, QuantizedWeight]:
    """Every ``nn.Linear`` of ``model`` (by qualified name) whose GGUF tensor is quantized, as its
    blocks, and the input embedding (under its name) where its table is; float tensors (F32,
    F16, BF16) are left to the caller. ``model`` is the model transformers loaded from the file
    ``reader`` reads (before any fusion of layers); every weight taken is checked against it."""
    mapping = _Mapping(model, reader)
    storage: dict[str, QuantizedWeight] = {}
    for module_name, module in model.named_modules():
        if type(module) is not nn.Linear and module is not mapping.embedding:
            continue
        loaded = cast(nn.Module, module).get_parameter("weight").detach()
        tensor = mapping.tensor(module_name, "weight")
        if tensor is None and loaded is getattr(mapping.embedding, "weight", None):  # a tied head
            tensor = mapping.tensors.get("token_embd.weight")
        if tensor is None or tensor.tensor_type in FLOAT_TYPES:
            continue
        weight = mapping.blocks(tensor, tuple(loaded.shape))
        if weight is None:
            continue
        if not torch.equal(weight.dequantize().to(loaded.dtype), loaded):
            raise RuntimeError(
                f"GGUF tensor {tensor.name} ({tensor.tensor_type.name}): its blocks do not give the weight "
                "transformers loaded; refusing to serve different numbers"
            )
        storage[module_name] = weight
    mapping.log_stored(len(storage))
    return storage


class NotDirectlyLoadable(RuntimeError):
    """A parameter that is not one GGUF tensor (e.g. a mixture of experts' stacked experts)."""


def load_direct(model: nn.Module, reader: gguf.GGUFReader, dtype: torch.dtype) -> dict[str, QuantizedWeight]:
    """Fills ``model``, built with its parameters on the meta device, from the file: float tensors
    (norms, biases, float layers) de-quantized as transformers does, in ``dtype``; the quantized
    linear layers and token table are returned as their blocks and their parameters never take
    memory (a model's float32 copy would: 4.7 GiB for a 1B Q4_K_M of 0.64 GiB, 32 GiB for an
    8B)."""
    mapping = _Mapping(model, reader)
    embedding = mapping.embedding
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    tied = embedding is not None and head is not None and head.weight is embedding.weight
    names = {module: name for name, module in model.named_modules()}
    storage: dict[str, QuantizedWeight] = {}
    for module, module_name in names.items():
        if tied and module is head:
            continue  # the embedding's tensor, settled with it
        for param_name, param in list(module.named_parameters(recurse=False)):
            tensor = mapping.tensor(module_name, param_name)
            if tensor is None:
                raise NotDirectlyLoadable(f"no GGUF tensor for {module_name}.{param_name}")
            quantized = param_name == "weight" and (type(module) is nn.Linear or module is embedding)
            if quantized and tensor.tensor_type not in FLOAT_TYPES:
                weight = mapping.blocks(tensor, tuple(param.shape))
                if weight is not None:
                    storage[module_name] = weight
                    continue
            module._parameters[param_name] = nn.Parameter(
                _floats(tensor, param, mapping.processor, dtype), requires_grad=False
            )
    if tied:
        assert head is not None and embedding is not None
        head.weight = embedding.weight  # the loaded table, or still meta when it is stored as blocks
        if names[embedding] in storage:
            storage[names[head]] = storage[names[embedding]]
    mapping.log_stored(len(storage), f"; the float tensors loaded in {dtype}")
    return storage


def _blocks(tensor: Any, shape: tuple[int, ...], processor: TensorProcessor) -> QuantizedWeight | None:
    """A weight's blocks in transformers' row order; None where transformers does more than reorder."""
    rows, columns = shape
    order = _row_order(processor, tensor.name, rows)
    if order is None:
        log.warning("GGUF tensor %s: transformers transforms it on load; kept as loaded", tensor.name)
        return None
    try:
        weight = decode(tensor.data, tensor.tensor_type, (rows, columns))
    except UnsupportedType:
        raise
    except ValueError as error:
        raise RuntimeError(f"GGUF tensor {tensor.name}: {error}") from error
    return weight if np.array_equal(order, np.arange(rows)) else weight.rows(torch.from_numpy(order))


def _floats(tensor: Any, param: torch.Tensor, processor: TensorProcessor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor de-quantized and processed as transformers loads it, in ``dtype``."""
    values = processor.process(
        weights=gguf.quants.dequantize(tensor.data, tensor.tensor_type), name=tensor.name, tensor_key_mapping={},
        parsed_parameters={"tensors": {}},
    ).weights  # fmt: skip
    loaded = torch.from_numpy(np.array(values, copy=True)).to(dtype)
    if loaded.shape != param.shape:
        raise NotDirectlyLoadable(
            f"GGUF tensor {tensor.name} has shape {tuple(loaded.shape)}, not {tuple(param.shape)}"
        )
    return loaded


def _name_map(model: nn.Module) -> gguf.TensorNameMap:
    """gguf's map of transformers' module names to its own, for this architecture (as transformers'
    ``get_gguf_hf_weights_map`` builds it, once instead of once per submodule)."""
    config: Any = model.config
    model_type = GGUF_MODEL_TYPES.get(config.model_type, config.model_type)
    arch = next((key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == model_type), None)
    if arch is None:
        raise RuntimeError(f"gguf knows no architecture {model_type!r}")
    return gguf.get_tensor_name_map(arch, config.get_text_config().num_hidden_layers)


#: transformers' model types that gguf names otherwise (from ``get_gguf_hf_weights_map``).
GGUF_MODEL_TYPES = {"cohere": "command-r", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3"}


def _gguf_name(name_map: gguf.TensorNameMap, module_name: str) -> str | None:
    """The GGUF name of a module, trying its name without leading components too (a causal LM's
    ``model.layers.0...`` may be mapped as ``layers.0...``)."""
    parts = module_name.split(".")
    for start in range(len(parts)):
        found = name_map.get_name(".".join(parts[start:]))
        if found is not None:
            return found
    return None


def _text_config(model: nn.Module) -> dict:
    config: Any = model.config
    return config.get_text_config().to_dict()


def _row_order(processor: TensorProcessor, tensor_name: str, rows: int) -> np.ndarray | None:
    """Where transformers puts each stored row: its processor applied to the row indices (the
    processors of 2-d linear weights only reorder rows). None if it does anything else."""
    indices = np.arange(rows, dtype=np.int64).reshape(rows, 1)
    result = processor.process(weights=indices, name=tensor_name, tensor_key_mapping={}, parsed_parameters={})
    order = np.asarray(result.weights)
    if result.name != tensor_name or order.shape != (rows, 1):
        return None
    order = order.reshape(rows)
    return order if np.array_equal(np.sort(order), np.arange(rows)) else None
