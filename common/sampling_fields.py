"""Every sampling parameter a request can set, declared once: its type, range and neutral value,
and its name in each API.

From this table come the bounds of the facade's pydantic request models (and so
``/openapi.json``), the router's checks of every request (HTTP and gRPC callers
alike, ``router.validation``) and a shard's own check of what it is sent
(``SamplingParams.problems``); a test checks that the table, ``SamplingParams``
and both protos name the same fields (tests/router/test_sampling_params.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingField:
    #: The name in ``SamplingParams`` and shard.proto's ``SamplingParameters``.
    name: str
    kind: type
    #: Allowed values: ``low`` .. ``high``, each end included unless ``*_open``; None: unbounded.
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    #: The value that changes nothing (a request that leaves the field out gets the model's
    #: default for temperature, top_p and repetition_penalty, else this).
    neutral: Any = None
    #: Its name in router.proto's ``GenerationParameters``, where it differs.
    router_name: str | None = None
    #: Other names requests use: OpenAI's, TGI's, vLLM's.
    aliases: tuple[str, ...] = ()

    @property
    def in_router(self) -> str:
        return self.router_name or self.name

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range ("top_p must be in (0, 1], got 0"), or None."""
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or value <= self.high
        if low_ok and high_ok:
            return None
        return f"{self.name} must be {self.range_text()}, got {value:g}"

    def range_text(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def pydantic_bounds(self) -> dict[str, Any]:
        """The range as pydantic ``Field`` constraints (``gt``/``ge``, ``le``)."""
        bounds: dict[str, Any] = {}
        if self.low is not None:
            bounds["gt" if self.low_open else "ge"] = self.low
        if self.high is not None:
            bounds["le"] = self.high
        return bounds


SAMPLING_FIELDS: tuple[SamplingField, ...] = (
    SamplingField("temperature", float, 0.0, 2.0, neutral=1.0),
    SamplingField("top_p", float, 0.0, 1.0, low_open=True, neutral=1.0),
    SamplingField("top_k", int, 0, None, neutral=0),
    SamplingField("seed", int, 0, None),
    SamplingField("min_p", float, 0.0, 1.0, neutral=0.0),
    SamplingField("typical_p", float, 0.0, 1.0, low_open=True, neutral=1.0),
    SamplingField("repetition_penalty", float, 0.0, None, low_open=True, neutral=1.0),
    SamplingField("frequency_penalty", float, -2.0, 2.0, neutral=0.0),
    SamplingField("presence_penalty", float, -2.0, 2.0, neutral=0.0),
    #: The range is each bias's; keys are token ids below the vocabulary size.
    SamplingField("logit_bias", float, -100.0, 100.0, neutral={}),
    #: The upper bound is the router's MAX_TOP_N_TOKENS.
    SamplingField("top_n_tokens", int, 0, None, neutral=0, aliases=("top_logprobs",)),
    SamplingField("min_tokens", int, 0, None, neutral=0, router_name="min_new_tokens", aliases=("min_new_tokens",)),
)

BY_NAME = {f.name: f for f in SAMPLING_FIELDS}
