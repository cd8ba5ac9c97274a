"""How the shards pick tokens: one dataclass for the router and the shards, and its protobuf form.

The router builds a ``SamplingParams`` per request (validated, with the model's
defaults filled in) and sends it as shard.proto's ``SamplingParameters``; the
shard turns the message back into the same dataclass. Both conversions iterate
the dataclass's fields, and a test checks that the dataclass and the message
have the same fields, so a parameter cannot be added to one side and dropped
on the way. Every field is always sent: a proto3 zero is a real zero, never a
"not set" that the shard would fill with a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from common.sampling_fields import SAMPLING_FIELDS
from protos import shard_pb2 as pb


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    #: (token id, bias) pairs, sorted by token id.
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: Most likely alternatives to report with each token (0 = none).
    top_n_tokens: int = 0
    #: Tokens banned until ``min_tokens`` tokens were generated (end of sequence).
    min_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()
    #: Output constraint as grammar text (xgrammar EBNF); empty for none.
    grammar: str = ""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def problems(self) -> list[str]:
        """What makes these values unusable, by the ranges of ``SAMPLING_FIELDS`` (the router
        validates requests before; a shard called directly checks again rather than divide by a
        zero it was sent)."""
        wrong = []
        for spec in SAMPLING_FIELDS:
            values = [b for _, b in self.logit_bias] if spec.name == "logit_bias" else [getattr(self, spec.name)]
            wrong += [why for v in values if (why := spec.problem(v)) is not None]
        return wrong


FIELDS = tuple(f.name for f in fields(SamplingParams))


def to_pb(params: SamplingParams) -> pb.SamplingParameters:
    values = {name: getattr(params, name) for name in FIELDS}
    values["logit_bias"] = dict(params.logit_bias)
    return pb.SamplingParameters(**values)


def from_pb(message: pb.SamplingParameters) -> SamplingParams:
    values = {name: getattr(message, name) for name in FIELDS}
    values["logit_bias"] = tuple(sorted(message.logit_bias.items()))
    values["eos_token_ids"] = tuple(message.eos_token_ids)
    return SamplingParams(**values)
