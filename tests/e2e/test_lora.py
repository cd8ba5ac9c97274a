"""LoRA adapters through the whole stack (issue 35), on the tiny random Llama with two PEFT
adapters made here (random, non-zero B), float32: the OpenAI client with model="<adapter>" and
TGI's adapter_id get transformers + PEFT's greedy tokens; /v1/models lists the adapters under
their base; adapters load and unload at run time (an unload waits for the requests running on
it); an unknown adapter is a 404 model_not_found, a bad folder a 400 naming it, and one given
at start stops the start with that message; adapters never share KV blocks; blocks end at 0."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from support.lora_adapters import build_adapter, peft_generate
from tests.conftest import launched_stack, running_stack

PROMPT = "The quick brown fox jumps over the lazy dog while the cat watches from the old stone wall"
NEW = 12


@pytest.fixture(scope="module")
def made(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    base = tiny_model_dir("llama")
    folder = tmp_path_factory.mktemp("lora-e2e")
    return {
        "base": base,
        "x": build_adapter(base, folder / "x", seed=11, rank=8),
        "y": build_adapter(base, folder / "y", seed=12, rank=16, rslora=True),
        "w": build_adapter(base, folder / "w", seed=13, rank=4),
    }


@pytest.fixture(scope="module")
def launched(made):
    env = {"MODEL_ID": str(made["base"]), "LORA_ADAPTERS": f"x={made['x']},{made['y']}", "MAX_TOTAL_TOKENS": "512"}
    with launched_stack(env) as running:
        yield running


@pytest.fixture(scope="module")
def stack(launched) -> str:
    return launched[0]


def tgi_tokens(stack: str, adapter: str | None) -> list[int]:
    parameters: dict[str, object] = {"max_new_tokens": NEW, "details": True, "decoder_input_details": False}
    if adapter:
        parameters["adapter_id"] = adapter
    r = httpx.post(f"{stack}/generate", json={"inputs": PROMPT, "parameters": parameters}, timeout=60)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def metric(stack: str, name: str) -> float:
    text = httpx.get(f"{stack}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_each_client_gets_peft_tokens_for_its_adapter(stack, made):
    prompt_ids = httpx.post(f"{stack}/tokenize", json={"prompt": PROMPT}, timeout=30).json()["tokens"]
    client = openai.OpenAI(base_url=f"{stack}/v1", api_key="-")
    answers = {}
    for adapter in ("x", "y", None):
        expected = peft_generate(made["base"], made[adapter] if adapter else None, prompt_ids, NEW)
        assert tgi_tokens(stack, adapter) == expected, adapter
        text = client.completions.create(
            model=adapter or "tgi", prompt=PROMPT, max_tokens=NEW, temperature=0, extra_body={"ignore_eos": True}
        )
        answers[adapter] = text.choices[0].text
        assert text.model == (adapter or "tgi")
    assert len(set(answers.values())) == 3, answers  # each adapter changes the answer
    # TGI's clients: huggingface_hub's InferenceClient and text_generation send parameters.adapter_id.
    hub = InferenceClient(stack).text_generation(PROMPT, adapter_id="y", max_new_tokens=NEW, details=True)
    assert [t.id for t in hub.details.tokens] == tgi_tokens(stack, "y")
    models = client.models.list().data
    assert [m.id for m in models][1:] == ["x", "y"]
    assert all(getattr(m, "parent", None) == models[0].id for m in models[1:])
    assert metric(stack, "switchyard_adapter_requests_total") >= 4
    assert "vllm:lora_requests_info" in httpx.get(f"{stack}/metrics", timeout=30).text


def test_unknown_adapters_are_404_and_bad_folders_400(stack, made, tmp_path):
    client = openai.OpenAI(base_url=f"{stack}/v1", api_key="-")
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert caught.value.code == "model_not_found"
    r = httpx.post(f"{stack}/generate", json={"inputs": "hi", "parameters": {"adapter_id": "nope"}}, timeout=30)
    assert r.status_code == 404 and "nope" in r.json()["error"]
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    r = httpx.post(f"{stack}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tmp_path)}, timeout=60)
    assert r.status_code == 400 and "adapter bad" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{stack}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(made["w"])}, timeout=60)
    assert r.status_code == 400 and "already loaded" in r.text
    r = httpx.post(f"{stack}/v1/embeddings", json={"model": "x", "input": "hi"}, timeout=30)
    assert r.status_code == 400 and "LoRA adapter" in r.json()["error"]["message"]
    assert tgi_tokens(stack, "x")  # still serving


def test_load_and_unload_at_run_time(stack, made):
    body = {"lora_name": "w", "lora_path": str(made["w"])}
    assert httpx.post(f"{stack}/v1/load_lora_adapter", json=body, timeout=60).status_code == 200
    prompt_ids = httpx.post(f"{stack}/tokenize", json={"prompt": PROMPT}, timeout=30).json()["tokens"]
    assert tgi_tokens(stack, "w") == peft_generate(made["base"], made["w"], prompt_ids, NEW)
    # An unload waits for the requests running on the adapter: this one completes in full.
    long = {"model": "w", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, f"{stack}/v1/completions", json=long, timeout=120)
        time.sleep(0.3)
        unloaded = pool.submit(httpx.post, f"{stack}/v1/unload_lora_adapter", json={"lora_name": "w"}, timeout=120)
        answer = running.result()
        assert unloaded.result().status_code == 200
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 200
    r = httpx.post(f"{stack}/v1/completions", json={**long, "max_tokens": 2}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "w" not in [m["id"] for m in httpx.get(f"{stack}/v1/models", timeout=30).json()["data"]]


def test_adapters_never_share_kv_blocks(stack):
    fresh = "Seven lanterns swung above the harbour as the night ferry docked beside the grain silos. " * 3

    def cached(model: str) -> int:
        body = {"model": model, "prompt": fresh, "max_tokens": 2, "temperature": 0}
        r = httpx.post(f"{stack}/v1/completions", json=body, timeout=60)
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    first = cached("x")
    assert cached("x") > first  # the same adapter hits its own blocks
    assert cached("y") == 0 and cached("tgi") == 0  # another adapter, or the base, never does
    time.sleep(0.5)
    assert metric(stack, "switchyard_kv_blocks_used") == 0


def test_an_adapter_that_does_not_fit_stops_the_start(made, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    env = {"MODEL_ID": str(made["base"]), "LORA_ADAPTERS": f"dora={tmp_path}"}
    refused = pytest.raises(RuntimeError, match="LORA_ADAPTERS: adapter dora: DoRA adapters are not served")
    with refused, running_stack(env, timeout_s=120):
        pass


def test_a_restarted_shard_gets_every_adapter_back(launched, made):
    """The router loads LORA_ADAPTERS' and run-time adapters onto a shard that restarted, before
    it warms it up: the same tokens after the restart."""
    url, launcher = launched
    body = {"lora_name": "v", "lora_path": str(made["w"])}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=60).status_code == 200
    before = {a: tgi_tokens(url, a) for a in ("x", "v")}
    found = subprocess.run(
        ["pgrep", "-P", str(launcher.pid), "-f", "python -m shard( |$)"], capture_output=True, text=True
    )
    os.kill(int(found.stdout.split()[0]), signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    assert {a: tgi_tokens(url, a) for a in ("x", "v")} == before
