"""Preemption and resumption against the real engine: the tokens equal an uninterrupted run."""

from __future__ import annotations

from common.model_source import resolve_model
from tests.router.harness import fake_router
from tests.shard.engine_driver import make_engine, reference

NEW_TOKENS = 40


async def test_preempted_requests_resume_with_transformers_tokens(tokenizer, tiny_model_dir, tmp_path):
    source = resolve_model(str(tiny_model_dir("llama")))
    block_size, num_blocks = 4, 24  # 96 KV tokens for three ~50-token sequences: someone must yield
    engine = make_engine(source, num_blocks_tokens=num_blocks * block_size, block_size=block_size)
    async with fake_router(
        tokenizer, tmp_path, num_blocks=num_blocks, block_size=block_size, max_total_tokens=96, engine=engine
    ) as h:
        prompts = ["The history of railways", "A short poem about", "Three reasons why"]
        requests = [h.request(p, max_new_tokens=NEW_TOKENS) for p in prompts]
        for r in requests:
            h.scheduler.submit(r)
        for _ in range(500):
            if not h.scheduler.waiting and not h.scheduler.active:
                break
            await h.scheduler.step()
            h.scheduler.allocator.check({r.id: r.blocks for r in h.scheduler.active})
        assert h.scheduler.metrics.preemptions._value.get() > 0
        for r in requests:
            want, _ = reference(source, r.prompt_ids, NEW_TOKENS)
            assert r.generated == want
        assert h.scheduler.allocator.used_blocks == 0
