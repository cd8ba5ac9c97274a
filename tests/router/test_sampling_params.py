"""The sampling parameters are listed once (common.sampling_params) and cross gRPC field by field."""

from __future__ import annotations

import dataclasses

import pytest

from common import sampling_params
from common.sampling_params import SamplingParams
from protos import shard_pb2 as pb
from shard.runtime.errors import InvalidRequest
from shard.runtime.server import request_from_pb


def test_the_dataclass_and_the_message_have_the_same_fields():
    assert set(sampling_params.FIELDS) == {f.name for f in pb.SamplingParameters.DESCRIPTOR.fields}


def test_every_field_survives_the_round_trip():
    params = SamplingParams(
        temperature=0.7, top_p=0.9, top_k=40, seed=2**62 + 5, min_p=0.05, typical_p=0.95,
        repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=-0.5, logit_bias=((3, -1.5), (17, 2.0)),
        top_n_tokens=5, min_tokens=3, eos_token_ids=(2, 7), grammar='root ::= "a"',
    )  # fmt: skip
    back = sampling_params.from_pb(sampling_params.to_pb(params))
    # float fields travel as float32: compare each as the message holds it.
    for field in dataclasses.fields(SamplingParams):
        want, got = getattr(params, field.name), getattr(back, field.name)
        assert got == pytest.approx(want, rel=1e-7) if isinstance(want, float) else got == want, field.name


def test_a_shard_refuses_values_it_cannot_use():
    """A proto3 zero is a zero: top_p 0 is refused, not silently read as 1."""
    message = pb.Request(id=1, input_ids=[1, 2], chunk_len=2, blocks=[0], parameters=pb.SamplingParameters())
    with pytest.raises(InvalidRequest, match="top_p"):
        request_from_pb(message)
    ok = sampling_params.to_pb(SamplingParams(temperature=1.0, seed=3))
    assert request_from_pb(pb.Request(id=1, input_ids=[1], chunk_len=1, blocks=[0], parameters=ok)).params.seed == 3
