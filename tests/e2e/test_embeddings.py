"""``/v1/embeddings`` through the whole stack (issue 36): OpenAI's shape (strings, lists, token
ids, float and base64, dimensions, usage), read by the OpenAI Python client, LangChain's
OpenAIEmbeddings and LlamaIndex's OpenAIEmbedding; the model's sentence-transformers pooling and
normalization; transformers' own hidden states as the oracle; the same bits whatever shares
the step.

One stack: a tiny random Llama made a sentence-transformers folder (mean pooling, Normalize,
Matryoshka dimensions 16 and 32), fp32.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import running_stack

TEXTS = ["The night mail crosses the border.", "Signals, points and level crossings.", "a"]


def sentence_transformers_folder(model_dir: Path, into: Path) -> Path:
    """``model_dir`` with sentence-transformers' modules: mean pooling, then Normalize."""
    shutil.copytree(model_dir, into, dirs_exist_ok=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (into / "modules.json").write_text(json.dumps(modules))
    (into / "1_Pooling").mkdir(exist_ok=True)
    (into / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    config = json.loads((into / "config.json").read_text())
    config["matryoshka_dimensions"] = [16, 32]
    (into / "config.json").write_text(json.dumps(config))
    return into


@pytest.fixture(scope="module")
def folder(tiny_model_dir, tmp_path_factory) -> Path:
    return sentence_transformers_folder(tiny_model_dir("llama"), tmp_path_factory.mktemp("st"))


@pytest.fixture(scope="module")
def stack(folder):
    with running_stack({"MODEL_ID": str(folder), "MAX_TOTAL_TOKENS": "512"}) as url:
        yield url


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack}/v1/", api_key="none", max_retries=0)


def post(stack: str, body: Any) -> httpx.Response:
    return httpx.post(f"{stack}/v1/embeddings", json=body, timeout=120)


def reference(folder: Path, text: str) -> torch.Tensor:
    """transformers' last_hidden_state, mean-pooled and normalized (the folder's modules)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        states = model.model(torch.tensor([tokenizer.encode(text)])).last_hidden_state[0]
    return torch.nn.functional.normalize(states.mean(0), dim=0)


def test_openai_client_and_the_oracle(stack, client, folder):
    answer = client.embeddings.create(model="tgi", input=TEXTS)  # the client asks for base64
    assert [d.index for d in answer.data] == [0, 1, 2] and answer.object == "list"
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0
    for text, item in zip(TEXTS, answer.data, strict=True):
        vector = torch.tensor(item.embedding)
        assert vector.shape == (64,) and abs(vector.norm().item() - 1) < 1e-5
        assert torch.allclose(vector, reference(folder, text), atol=1e-5)
    floats = post(stack, {"input": TEXTS[0], "encoding_format": "float"}).json()["data"][0]["embedding"]
    assert floats == answer.data[0].embedding  # the float32 values, whichever encoding
    raw = post(stack, {"input": TEXTS[0], "encoding_format": "base64"}).json()["data"][0]["embedding"]
    assert list(struct.unpack("<64f", base64.b64decode(raw))) == floats


def test_token_ids_dimensions_and_normalize(stack, client):
    by_text = post(stack, {"input": TEXTS[1], "encoding_format": "float"}).json()
    tokens = httpx.post(f"{stack}/tokenize", json={"prompt": TEXTS[1]}).json()["tokens"]
    by_ids = post(stack, {"input": tokens, "encoding_format": "float"}).json()
    assert by_ids["data"][0]["embedding"] == by_text["data"][0]["embedding"]
    two = post(stack, {"input": [tokens, tokens[:3]], "encoding_format": "float"}).json()
    assert len(two["data"]) == 2 and two["data"][0]["embedding"] == by_text["data"][0]["embedding"]
    cut = client.embeddings.create(model="tgi", input=TEXTS[1], dimensions=16).data[0].embedding
    assert len(cut) == 16 and abs(sum(x * x for x in cut) - 1) < 1e-5  # cut, then normalized
    raw = post(stack, {"input": TEXTS[1], "encoding_format": "float", "normalize": False}).json()
    assert abs(sum(x * x for x in raw["data"][0]["embedding"]) - 1) > 1e-3
    for bad, param in (
        ({"input": ""}, "input[0]"), ({"input": []}, "input"), ({"input": TEXTS[0], "dimensions": 20}, "dimensions"),
        ({"input": [[]]}, "input[0]"), ({"input": [10**9]}, "input"), ({"input": "x", "encoding_format": "hex"},
        "encoding_format"), ({"input": "x", "bogus": 1}, "bogus"), ({"input": "word " * 600}, "input"),
    ):  # fmt: skip
        r = post(stack, bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_langchain_and_llamaindex(stack, client):
    from langchain_openai import OpenAIEmbeddings
    from llama_index.embeddings.openai import OpenAIEmbedding

    expected = client.embeddings.create(model="tgi", input=TEXTS[:2]).data
    # LangChain counts tokens with tiktoken unless told not to (it cannot fetch its tables here).
    lc = OpenAIEmbeddings(model="tgi", base_url=f"{stack}/v1", api_key="none", check_embedding_ctx_length=False)
    assert lc.embed_documents(TEXTS[:2]) == [d.embedding for d in expected]
    assert lc.embed_query(TEXTS[0]) == expected[0].embedding
    li = OpenAIEmbedding(api_base=f"{stack}/v1", api_key="none")  # its default model name: the server serves one
    assert li.get_text_embedding(TEXTS[1]) == expected[1].embedding


def test_an_embedding_does_not_depend_on_its_step(stack, client):
    """The same input alone, and among generation and embedding requests sharing its steps."""
    alone = post(stack, {"input": TEXTS[0], "encoding_format": "float"}).json()["data"][0]["embedding"]

    def generate(i: int) -> None:
        body = {"prompt": f"Train {i} " * 20, "max_tokens": 24, "ignore_eos": True}
        assert httpx.post(f"{stack}/v1/completions", json=body, timeout=120).status_code == 200

    def embed(i: int) -> list[float]:
        texts = [f"Companion {i} " * (i + 1), TEXTS[0]]
        data = post(stack, {"input": texts, "encoding_format": "float"}).json()["data"]
        return list(data[1]["embedding"])

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        busy = [pool.submit(generate, i) for i in range(6)]
        found = [pool.submit(embed, i) for i in range(6)]
        concurrent.futures.wait(busy)
        assert all(f.result() == alone for f in found)
    metrics = httpx.get(f"{stack}/metrics").text
    assert "switchyard_kv_blocks_used 0" in metrics or "switchyard_kv_blocks_used 0.0" in metrics
