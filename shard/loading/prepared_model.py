"""The model as prepared for serving, saved once and mapped from disk on later starts.

Preparing the default model takes ~25 s on a 2-core CPU: transformers de-quantizes
the GGUF file in Python, then every linear layer is packed into the kernel's tiles
(``shard.numerics.invariant_linear``). The result depends only on the weight files, the
dtype, the storage plan, the versions of torch and transformers, the shard's own
code and the CPU's vector width, so it is saved once (``torch.save`` of the module)
and a restart maps it back (``mmap``: the pages are shared with the page cache,
nothing is copied or converted) in well under a second.

Only single-rank CPU models are cached: tensor-parallel ranks load their slice
through torch.distributed, and a GPU load has no comparable preparation cost.
Hub ids are not cached either (no local files to key on).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel

from common.disk_cache import (
    cache_root,
    code_fingerprint,
    digest,
    file_identity,
    host_fingerprint,
    written_atomically,
)
from common.model_source import ModelSource
from shard.loading.model_loader import load_model
from shard.numerics import attention

log = logging.getLogger(__name__)

#: Entries kept, least recently used evicted first (tests make many tiny ones).
MAX_ENTRIES = 6
#: Never fill the disk: skip saving when less than this would remain free.
MIN_FREE_BYTES = 2 << 30


def load_prepared_model(
    source: ModelSource, dtype: torch.dtype, device: torch.device, world_size: int, quantize: str, use_cache: bool
) -> PreTrainedModel:
    key = cache_key(source, dtype, quantize) if use_cache and device.type == "cpu" and world_size == 1 else None
    if key is None:
        return load_model(source, dtype, device, world_size, quantize)
    path = cache_root() / "models" / f"{key}.pt"
    if path.exists():
        try:
            return _map(path)
        except Exception as exc:  # a truncated or foreign file: rebuild it
            log.warning("prepared model %s unreadable (%s): preparing again", path, exc)
            path.unlink(missing_ok=True)
    model = load_model(source, dtype, device, world_size, quantize)
    _save(model, path)
    return model


def cache_key(source: ModelSource, dtype: torch.dtype, quantize: str) -> str | None:
    folder = Path(source.path_or_id)
    if not folder.is_dir():
        return None
    if source.gguf_file:
        files = [folder / source.gguf_file]
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix in {".json", ".safetensors", ".bin", ".pt"})
    parts = [file_identity(f) for f in files]
    versions = [torch.__version__, transformers.__version__, code_fingerprint(), host_fingerprint()]
    return digest([*parts, str(dtype), quantize, *versions])


def _map(path: Path) -> PreTrainedModel:
    started = time.perf_counter()
    attention.register()  # the model's config names our attention implementation
    model = torch.load(path, mmap=True, weights_only=False)
    os.utime(path)  # recently used: evicted last
    log.info("prepared model mapped from %s in %.1f s", path, time.perf_counter() - started)
    return model


def _save(model: PreTrainedModel, path: Path) -> None:
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(path.parent).free < MIN_FREE_BYTES:
        log.warning("not caching the prepared model: less than %d GiB free in %s", MIN_FREE_BYTES >> 30, path.parent)
        return
    try:
        with written_atomically(path, ".part") as partial:
            torch.save(model, partial)
    except Exception as exc:  # not picklable, disk full, ...: serve anyway, just slower next time
        log.warning("could not cache the prepared model: %s", exc)
        return
    log.info("prepared model cached in %s (%.1f s)", path, time.perf_counter() - started)
    _evict(path.parent, keep=path)


def _evict(folder: Path, keep: Path) -> None:
    entries = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [e for e in entries if e != keep][MAX_ENTRIES - 1 :]:
        old.unlink(missing_ok=True)
