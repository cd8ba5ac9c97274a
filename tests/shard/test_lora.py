"""LoRA adapters in the shard (shard.numerics.lora, shard.loading.lora): float32 greedy output
of each adapter equals transformers + PEFT's generate, for every adapter in a mixed batch, and a
probe's tokens and logprobs are bit-identical whatever adapters its companions use."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from common.model_source import default_model_dir, resolve_model
from shard.loading.lora import AdapterError
from shard.numerics.sampling import SamplingParams
from shard.runtime.engine import Engine
from shard.runtime.errors import InvalidRequest
from support.lora_adapters import ATTENTION, build_adapter, peft_generate
from tests.shard.engine_driver import Driver, Tracked, make_engine

PROMPTS = [[(i * 37 + 11 * j) % 3000 + 5 for i in range(9 + 3 * j)] for j in range(3)]
NEW = 10
GREEDY = SamplingParams(temperature=0.0)


def adapters_for(kind: str, tiny_model_dir, tmp_path_factory) -> dict[str, object]:
    base = tiny_model_dir(kind)
    targets = ATTENTION if kind == "mixtral" else None
    folder = tmp_path_factory.mktemp(f"lora-{kind}")
    return {
        "base": base,
        "x": build_adapter(base, folder / "x", seed=1, rank=8, targets=targets),
        "y": build_adapter(base, folder / "y", seed=2, rank=4, targets=targets, rslora=True),
    }


def generate_all(engine: Engine, requests: list[Tracked], chunk: int = 64) -> None:
    """Prefills every request (in chunks of ``chunk``), then decodes them together to NEW tokens."""
    driver = Driver(engine)
    while any(t.computed < len(t.prompt) for t in requests):
        driver.prefill([(t, min(chunk, len(t.prompt) - t.computed)) for t in requests if t.computed < len(t.prompt)])
    while any(len(t.tokens) < NEW for t in requests):
        driver.decode()
    engine.clear(None)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mixtral"])
def test_each_adapter_in_a_mixed_batch_equals_peft(kind, tiny_model_dir, tmp_path_factory):
    made = adapters_for(kind, tiny_model_dir, tmp_path_factory)
    engine = make_engine(resolve_model(str(made["base"])))
    engine.load_adapter("x", str(made["x"]))
    engine.load_adapter("y", str(made["y"]))
    requests = [Tracked(i + 1, PROMPTS[i], GREEDY, adapter=a) for i, a in enumerate(["x", "y", ""])]
    generate_all(engine, requests)
    for t in requests:
        folder = made[t.adapter] if t.adapter else None
        expected = peft_generate(made["base"], folder, t.prompt, NEW)  # type: ignore[arg-type]
        assert t.tokens[:NEW] == expected, (kind, t.adapter or "base")
        if folder is not None:  # the adapter does change the output: the test could not pass with no delta
            assert expected != peft_generate(made["base"], None, t.prompt, NEW)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def llama_engine(tiny_model_dir, tmp_path_factory):
    made = adapters_for("llama", tiny_model_dir, tmp_path_factory)
    engine = make_engine(resolve_model(str(made["base"])))
    engine.load_adapter("x", str(made["x"]))
    engine.load_adapter("y", str(made["y"]))
    return engine


def probe(engine: Engine, companions: list[str], chunk: int) -> tuple[list[int], list[float]]:
    t = Tracked(1, PROMPTS[2], SamplingParams(temperature=0.8, seed=9, top_p=0.9), adapter="x")
    others = [Tracked(2 + i, PROMPTS[i % 2], SamplingParams(temperature=1.0, seed=i), adapter=a)
              for i, a in enumerate(companions)]  # fmt: skip
    generate_all(engine, [t, *others], chunk)
    return t.tokens[:NEW], t.logprobs[:NEW]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(companions=st.lists(st.sampled_from(["", "x", "y"]), max_size=3), chunk=st.sampled_from([3, 8, 64]))
def test_a_probe_is_bit_identical_whatever_its_companions(llama_engine, companions, chunk):
    alone = probe(llama_engine, [], 64)
    assert probe(llama_engine, companions, chunk) == alone


def write_adapter(folder, weights: dict[str, torch.Tensor], **config) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return str(folder)


def test_adapters_that_do_not_fit_are_refused(llama_engine, tmp_path):
    """Each refusal names the adapter and the module; the engine keeps its adapters and serves."""
    engine = llama_engine
    key = "base_model.model.model.layers.{}.{}.lora_{}.weight"
    a, b = torch.randn(2, 64), torch.randn(64, 2)
    cases = {
        "adapter_config.json not found": None,
        r"layers\.0\.self_attn\.q_proj: shapes .* another base model": {
            key.format(0, "self_attn.q_proj", "A"): torch.randn(2, 32), key.format(0, "self_attn.q_proj", "B"): b},
        r"layers\.5\.self_attn\.q_proj: the model has 2 layers": {
            key.format(5, "self_attn.q_proj", "A"): a, key.format(5, "self_attn.q_proj", "B"): b},
        r"layers\.0\.self_attn\.rotary_emb: not a projection": {
            key.format(0, "self_attn.rotary_emb", "A"): a, key.format(0, "self_attn.rotary_emb", "B"): b},
        r"layers\.0\.mlp\.up_proj has lora_A without its pair": {key.format(0, "mlp.up_proj", "A"): a},
        "lm_head.lora_A.weight is not a LoRA weight of a decoder layer": {
            "base_model.model.lm_head.lora_A.weight": a},
    }  # fmt: skip
    for i, (message, weights) in enumerate(cases.items()):
        folder = str(tmp_path / f"none{i}") if weights is None else write_adapter(tmp_path / f"a{i}", weights)
        with pytest.raises(AdapterError, match=f"adapter bad{i}: .*{message}"):
            engine.load_adapter(f"bad{i}", folder)
    refused = {"use_dora": True, "bias": "all", "modules_to_save": ["lm_head"]}
    for i, (field, value) in enumerate(refused.items()):
        weights = {key.format(0, "self_attn.q_proj", "A"): a, key.format(0, "self_attn.q_proj", "B"): b}
        folder = write_adapter(tmp_path / f"c{i}", weights, **{field: value})
        with pytest.raises(AdapterError, match=f"adapter c{i}: "):
            engine.load_adapter(f"c{i}", folder)
    (tmp_path / "a1" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="unreadable"):
        engine.load_adapter("broken", str(tmp_path / "a1"))
    with pytest.raises(InvalidRequest, match="adapter nope is not loaded"):
        generate_all(engine, [Tracked(1, PROMPTS[0], GREEDY, adapter="nope")])
    engine.clear(None)
    assert set(engine.adapters) == {"x", "y"}
    with pytest.raises(InvalidRequest, match="not loaded"):
        engine.unload_adapter("nope")


def test_the_default_model_with_an_adapter_equals_peft(tmp_path):
    """The default model as served (its Q4_1 blocks, float32 activations) with a rank-8 adapter on
    every projection, beside a base request: transformers + PEFT on the file's de-quantized
    weights (the very values the blocks hold) gives the same greedy tokens."""
    source = resolve_model(None)
    folder, gguf = default_model_dir(), source.gguf_file
    adapter = build_adapter(folder, tmp_path / "a", seed=21, rank=8, gguf_file=gguf)
    engine = make_engine(source, quantize="auto")
    engine.load_adapter("a", str(adapter))
    requests = [Tracked(1, PROMPTS[1], GREEDY, adapter="a"), Tracked(2, PROMPTS[2], GREEDY)]
    generate_all(engine, requests)
    for t, path in zip(requests, (adapter, None), strict=True):
        assert t.tokens[:NEW] == peft_generate(folder, path, t.prompt, NEW, gguf_file=gguf), t.adapter or "base"


def test_an_unloaded_adapter_leaves_no_step_tables(llama_engine, tiny_model_dir, tmp_path):
    """What steps built for an adapter goes with it: the cache keeps no unloaded weights alive."""
    from shard.numerics import lora

    engine = llama_engine
    engine.load_adapter("z", str(build_adapter(tiny_model_dir("llama"), tmp_path / "z", seed=7, rank=4)))
    generate_all(engine, [Tracked(1, PROMPTS[0], GREEDY, adapter="z")])
    adapter = engine.adapters["z"]
    assert any(adapter in key[0] for key in lora._TABLES.entries)
    engine.unload_adapter("z")
    assert not any(adapter in key[0] for cache in (lora._TABLES, lora._NATIVE) for key in cache.entries)
