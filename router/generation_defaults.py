"""Sampling values a model's authors recommend, used when a request leaves them out.

As vLLM does with a model's ``generation_config.json``: an OpenAI client that
sends no temperature gets what the model was tuned for rather than OpenAI's
1.0, which makes small instruct models ramble. A request that sets a value
always wins. Without any recommendation, OpenAI's defaults apply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from transformers import GenerationConfig

from common.model_source import DEFAULT_MODEL_NAME, ModelSource
from common.sampling_fields import BY_NAME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationDefaults:
    """Without a recommendation: OpenAI's defaults, the table's neutral values."""

    temperature: float = BY_NAME["temperature"].neutral
    top_p: float = BY_NAME["top_p"].neutral
    top_k: int = BY_NAME["top_k"].neutral
    repetition_penalty: float = BY_NAME["repetition_penalty"].neutral


#: The embedded model's GGUF carries no generation config: these are its model card's settings.
_EMBEDDED = GenerationDefaults(temperature=0.2, top_p=0.9)


def load_defaults(source: ModelSource) -> GenerationDefaults:
    if source.display_name == DEFAULT_MODEL_NAME and source.gguf_file:
        return _EMBEDDED
    try:
        config = GenerationConfig.from_pretrained(source.path_or_id, **source.pretrained_kwargs())  # type: ignore[arg-type]
    except (OSError, ValueError):
        return GenerationDefaults()
    if not config.do_sample:
        return GenerationDefaults()
    defaults = GenerationDefaults(
        temperature=float(config.temperature if config.temperature is not None else 1.0),
        top_p=float(config.top_p if config.top_p is not None else 1.0),
        top_k=int(config.top_k or 0),
        repetition_penalty=float(config.repetition_penalty or 1.0),
    )
    log.info("sampling defaults from the model's generation config: %s", defaults)
    return defaults
