"""How the served model embeds: pooling, normalization, the dimensions it may be cut to.

A sentence-transformers folder says it itself (``modules.json``: a Pooling module
whose ``1_Pooling/config.json`` names the mode, and a Normalize module or not);
otherwise POOLING decides (last token by default, as e5-mistral and gte-Qwen use)
and vectors are normalized. Cutting to fewer ``dimensions`` is allowed only for
models trained for it (Matryoshka): their ``config.json`` says ``is_matryoshka``
or lists ``matryoshka_dimensions``, as vLLM reads them.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from common.model_source import ModelSource
from protos import shard_pb2
from router.errors import ValidationError

log = logging.getLogger(__name__)

POOLINGS = {"last": shard_pb2.POOLING_LAST, "mean": shard_pb2.POOLING_MEAN, "cls": shard_pb2.POOLING_FIRST}
#: sentence-transformers' pooling modes -> ours.
_ST_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


@dataclass(frozen=True)
class EmbeddingConfig:
    pooling: str = "last"
    normalize: bool = True
    #: Width of the model's hidden states (the embedding's full size).
    size: int = 0
    #: Whether ``dimensions`` may cut it, and to which sizes (empty: any up to ``size``).
    matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] = ()

    @property
    def shard_pooling(self) -> int:
        return POOLINGS[self.pooling]

    def finish(self, vector: list[float], dimensions: int, normalize: bool | None) -> list[float]:
        """The pooled vector cut to ``dimensions`` (0: all), then normalized unless told otherwise."""
        if dimensions:
            vector = vector[:dimensions]
        if normalize if normalize is not None else self.normalize:
            norm = math.sqrt(math.fsum(x * x for x in vector))
            vector = [x / max(norm, 1e-12) for x in vector]
        return vector

    def check_dimensions(self, dimensions: int) -> None:
        if not dimensions:
            return
        if not self.matryoshka:
            raise ValidationError(
                "this model does not support 'dimensions': it was not trained to be cut (Matryoshka)", "dimensions"
            )
        allowed = self.matryoshka_dimensions or tuple(range(1, self.size + 1))
        if dimensions not in allowed:
            sizes = f"one of {list(self.matryoshka_dimensions)}" if self.matryoshka_dimensions else f"1..{self.size}"
            raise ValidationError(f"dimensions must be {sizes}, got {dimensions}", "dimensions")


def load_embedding_config(source: ModelSource, pooling_setting: str) -> EmbeddingConfig:
    """``embedding_config`` of the served model."""
    try:
        model_config = AutoConfig.from_pretrained(source.path_or_id, **source.pretrained_kwargs())
    except (OSError, ValueError) as exc:
        log.warning("no model config for embeddings (%s): pooling %s, any size", exc, pooling_setting)
        return EmbeddingConfig(pooling_setting)
    return embedding_config(source.path_or_id, pooling_setting, model_config)


def embedding_config(folder: str, pooling_setting: str, model_config: Any) -> EmbeddingConfig:
    """The served model's embedding behaviour (``model_config``: its transformers config)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    size = int(getattr(text, "hidden_size", 0) or 0)
    dims = tuple(int(d) for d in getattr(model_config, "matryoshka_dimensions", None) or ())
    matryoshka = bool(getattr(model_config, "is_matryoshka", False) or dims)
    pooling, normalize = pooling_setting, True
    st = _sentence_transformers(Path(folder))
    if st is not None:
        pooling, normalize = st
    return EmbeddingConfig(pooling, normalize, size, matryoshka, dims)


def _sentence_transformers(folder: Path) -> tuple[str, bool] | None:
    """(pooling, normalize) from a sentence-transformers folder's modules, or None."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    pooling_module = kinds.get("Pooling")
    if pooling_module is None:
        return None
    try:
        config = json.loads((folder / pooling_module.get("path", "") / "config.json").read_text())
    except (OSError, ValueError):
        return None
    modes = [ours for key, ours in _ST_MODES.items() if config.get(key)]
    if len(modes) != 1:
        log.warning("sentence-transformers pooling %s is not one of last, mean, cls: using POOLING", config)
        return None
    return modes[0], "Normalize" in kinds
