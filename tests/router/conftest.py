from __future__ import annotations

import pytest

from common.model_source import resolve_model
from router.tokenization import Tokenizer


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.load(resolve_model(str(tiny_model_dir("llama"))))
