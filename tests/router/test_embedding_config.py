"""How the served model embeds (router.embeddings): POOLING unless a sentence-transformers folder
says otherwise; dimensions only for Matryoshka models; cut, then normalized."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from router.embeddings import EmbeddingConfig, embedding_config
from router.errors import ValidationError


def test_pooling_from_setting_or_sentence_transformers(tmp_path):
    config = LlamaConfig(hidden_size=64)
    assert embedding_config(str(tmp_path), "last", config) == EmbeddingConfig("last", True, 64)
    (tmp_path / "modules.json").write_text(
        json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    )
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    found = embedding_config(str(tmp_path), "last", config)
    assert (found.pooling, found.normalize) == ("cls", False)  # no Normalize module


def test_dimensions_and_normalization():
    plain = EmbeddingConfig("last", True, 8)
    with pytest.raises(ValidationError):
        plain.check_dimensions(4)
    plain.check_dimensions(0)
    listed = EmbeddingConfig("mean", True, 8, True, (2, 4))
    listed.check_dimensions(4)
    with pytest.raises(ValidationError):
        listed.check_dimensions(3)
    assert listed.finish([3.0, 4.0, 100.0], 2, None) == [0.6, 0.8]
    assert listed.finish([3.0, 4.0], 0, False) == [3.0, 4.0]
