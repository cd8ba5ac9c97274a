"""Sampling defaults when a request leaves them out: the model's recommendation, else OpenAI's."""

from __future__ import annotations

from transformers import GenerationConfig

from common.model_source import resolve_model
from protos import router_pb2 as pb
from router.config import Limits
from router.generation_defaults import GenerationDefaults, load_defaults
from router.validation import Validator


def test_embedded_model_uses_its_model_card_settings():
    assert load_defaults(resolve_model(None)) == GenerationDefaults(temperature=0.2, top_p=0.9)


def test_generation_config_is_read_and_requests_still_win(tiny_model_dir, tmp_path, tokenizer):
    folder = tiny_model_dir("llama")
    assert load_defaults(resolve_model(str(folder))) == GenerationDefaults()  # do_sample false: OpenAI's
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.8, top_k=20).save_pretrained(tmp_path)
    defaults = load_defaults(resolve_model(str(folder)).__class__(str(tmp_path), None, "x"))
    assert defaults == GenerationDefaults(temperature=0.6, top_p=0.8, top_k=20)
    validator = Validator(tokenizer, Limits(100, 200, 100, 8), 4, defaults=defaults)
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")])
    implicit = validator.request(1, pb.GenerateRequest(chat=chat)).sampling
    assert (implicit.temperature, implicit.top_p, implicit.top_k) == (0.6, 0.8, 20)
    explicit = validator.request(2, pb.GenerateRequest(chat=chat, parameters=pb.GenerationParameters(temperature=0)))
    assert (explicit.sampling.temperature, explicit.sampling.top_k) == (0.0, 0)
