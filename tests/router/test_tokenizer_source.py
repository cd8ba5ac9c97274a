"""A GGUF model's tokenizer, converted once to transformers' files, tokenizes as the GGUF does."""

from __future__ import annotations

from common import model_source
from common.model_source import resolve_model, tokenizer_source
from router.tokenization import Tokenizer


def test_converted_tokenizer_renders_and_tokenizes_as_the_gguf(tmp_path, monkeypatch):
    monkeypatch.setattr(model_source, "cache_root", lambda: tmp_path)
    gguf = resolve_model(None)
    converted = tokenizer_source(gguf)
    assert converted.gguf_file is None and converted.path_or_id.startswith(str(tmp_path))
    assert tokenizer_source(gguf) == converted  # the second start reuses the files
    original, fast = Tokenizer.load(gguf), Tokenizer.load(converted)
    chat = [
        {"role": "system", "content": "Réponds en JSON 🚀"},
        {"role": "user", "content": "a <|im_end|> b\n\n\tc"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for rendered in (original.render_chat(chat), original.render_chat(chat, tools)):
        assert rendered in (fast.render_chat(chat), fast.render_chat(chat, tools))
        assert original.hf(rendered)["input_ids"] == fast.hf(rendered)["input_ids"]
    assert original.eos_token_ids == fast.eos_token_ids
    assert original.special_ids == fast.special_ids
    ids = list(range(0, 49152, 61))
    assert original.hf.decode(ids) == fast.hf.decode(ids)
