"""Tensor parallelism on CPU (gloo): 2 ranks give the 1-rank tokens; a dying rank restarts its group unseen."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import launched_stack, running_stack

QUESTIONS = ["Hi", "Tell me about the longest railway tunnel in the world and how it was built.", "Why?"]
TOKENS = 12


def oracle(model_dir, question: str) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": question}]
    ids = tok.encode(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    out = model.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


async def ask_all(url: str) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1/", api_key="-")

    async def one(q: str) -> str:
        r = await client.chat.completions.create(
            model="tgi",
            messages=[{"role": "user", "content": q}],
            max_tokens=TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].message.content or ""

    return list(await asyncio.gather(*(one(q) for q in QUESTIONS)))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_two_ranks_match_one(kind, tiny_model_dir):
    model_dir = tiny_model_dir(kind)
    with running_stack({"MODEL_ID": str(model_dir), "NUM_SHARD": "2"}) as url:
        answers = asyncio.run(ask_all(url))
    assert answers == [oracle(model_dir, q) for q in QUESTIONS]


def test_two_ranks_are_reproducible_within_their_world_size(tiny_model_dir):
    """Within one world size a seeded request gives the same tokens and logprobs cold, from the
    prefix cache and among other requests (across world sizes only the last bits may differ)."""
    messages = [{"role": "user", "content": "Name the stations of a long railway line, one per line, please."}]

    async def run(url: str) -> list[list[tuple[str, float]]]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1/", api_key="-", max_retries=0)

        async def probe() -> list[tuple[str, float]]:
            r = await client.chat.completions.create(
                model="tgi", messages=messages, max_tokens=TOKENS, temperature=1.0, seed=7, logprobs=True
            )
            assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content
            return [(t.token, t.logprob) for t in r.choices[0].logprobs.content]

        async def other(i: int) -> None:
            await client.chat.completions.create(
                model="tgi", messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=6 + i, seed=i
            )

        cold, warm = await probe(), await probe()
        crowded_probe = asyncio.create_task(probe())
        await asyncio.gather(*(other(i) for i in range(6)))
        crowded = await crowded_probe
        return [cold, warm, crowded]

    with running_stack({"MODEL_ID": str(tiny_model_dir("qwen2")), "NUM_SHARD": "2"}) as url:
        cold, warm, crowded = asyncio.run(run(url))
    assert len(cold) == TOKENS
    assert warm == cold
    assert crowded == cold


def _child_pid(parent: int, needle: str) -> int:
    out = subprocess.run(["pgrep", "-P", str(parent), "-f", needle], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def test_a_dying_rank_restarts_the_group_and_the_stream_continues(tiny_model_dir):
    env = {"MODEL_ID": str(tiny_model_dir("llama")), "NUM_SHARD": "2"}
    with launched_stack(env) as (url, launcher):
        client = openai.OpenAI(base_url=f"{url}/v1/", api_key="-", max_retries=0, timeout=120)
        request = {
            "model": "tgi",
            "messages": [{"role": "user", "content": "Go on for a while."}],
            "max_tokens": 60,
            "stream": True,
            "extra_body": {"ignore_eos": True},
            "temperature": 0.0,
        }
        expected = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**request))
        rank1 = _child_pid(launcher.pid, "shard.*--rank 1")
        text, finish = [], None
        for i, chunk in enumerate(client.chat.completions.create(**request)):
            if i == 3:
                os.kill(rank1, signal.SIGKILL)
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"
        assert "".join(text) == expected  # both ranks restarted, the request recomputed, nothing lost
        assert _child_pid(launcher.pid, "shard.*--rank 1") != rank1
        assert launcher.poll() is None
