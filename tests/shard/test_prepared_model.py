"""The prepared-model cache: a restart maps exactly the model a fresh load prepares."""

from __future__ import annotations

import os

import pytest
import torch

from common.model_source import resolve_model
from shard.loading import prepared_model
from shard.loading.prepared_model import cache_key, load_prepared_model
from shard.numerics.sampling import SamplingParams
from shard.runtime.engine import Engine
from shard.runtime.kv_cache import KVLayout, PagedKVCache
from tests.shard.engine_driver import Driver, Tracked

CPU = torch.device("cpu")


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(prepared_model, "cache_root", lambda: tmp_path)
    return tmp_path / "models"


def greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    engine = Engine(model, CPU, 4, kv_fraction=0.5)
    engine.warmup(64, 4, 1024)
    driver = Driver(engine)
    t = Tracked(1, prompt, SamplingParams(temperature=0.0))
    driver.prefill([(t, len(prompt))])
    for _ in range(new_tokens - 1):
        driver.decode()
    return t.tokens, t.logprobs


def test_a_restart_maps_the_same_model(tiny_model_dir, cache_folder, caplog):
    source = resolve_model(str(tiny_model_dir("qwen2")))
    fresh = load_prepared_model(source, torch.float32, CPU, 1, "none", use_cache=True)
    assert len(list(cache_folder.glob("*.pt"))) == 1
    with caplog.at_level("INFO", logger="shard.loading.prepared_model"):
        mapped = load_prepared_model(source, torch.float32, CPU, 1, "none", use_cache=True)
    assert "mapped from" in caplog.text
    fresh_state, mapped_state = dict(fresh.named_buffers()), dict(mapped.named_buffers())
    assert fresh_state.keys() == mapped_state.keys()
    assert all(torch.equal(fresh_state[k], mapped_state[k]) for k in fresh_state)
    prompt = list(range(5, 40))
    assert greedy(fresh, prompt, 6) == greedy(mapped, prompt, 6)  # bit for bit, logprobs included


def test_anything_the_preparation_depends_on_changes_the_key(tiny_model_dir, tmp_path):
    source = resolve_model(str(tiny_model_dir("llama")))
    key = cache_key(source, torch.float32, "none")
    assert key == cache_key(source, torch.float32, "none")
    assert key != cache_key(source, torch.bfloat16, "none")
    assert key != cache_key(source, torch.float32, "int4")
    weights = next(p for p in tiny_model_dir("llama").iterdir() if p.suffix == ".safetensors")
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        assert key != cache_key(source, torch.float32, "none")  # rewritten weights
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache_key(resolve_model("some-org/some-model"), torch.float32, "none") is None  # hub ids: no files


def test_an_unreadable_entry_is_prepared_again(tiny_model_dir, cache_folder):
    source = resolve_model(str(tiny_model_dir("llama")))
    load_prepared_model(source, torch.float32, CPU, 1, "none", use_cache=True)
    (entry,) = cache_folder.glob("*.pt")
    entry.write_bytes(b"truncated")
    model = load_prepared_model(source, torch.float32, CPU, 1, "none", use_cache=True)
    assert model is not None and entry.stat().st_size > 1000


def test_least_recently_used_entries_are_evicted(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for i in range(prepared_model.MAX_ENTRIES + 3):
        (folder / f"{i}.pt").write_bytes(b"x")
        os.utime(folder / f"{i}.pt", (i, i))
    prepared_model._evict(folder, keep=folder / "0.pt")
    left = sorted(p.name for p in folder.glob("*.pt"))
    assert len(left) == prepared_model.MAX_ENTRIES and "0.pt" in left  # the entry just written stays


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_starts_zeroed_without_touching_its_pages(dtype):
    cache = PagedKVCache(KVLayout(2, 2, 8, dtype), num_blocks=64, block_size=4, device=CPU)
    assert cache.keys[0].dtype == dtype and cache.keys[0].shape == (256, 2, 8)
    assert all(not t.any() for t in cache.keys + cache.values)
    cache.write(1, torch.tensor([3]), torch.ones(1, 2, 8), torch.ones(1, 2, 8))
    assert cache.keys[1][3].eq(1).all() and not cache.keys[0].any()
