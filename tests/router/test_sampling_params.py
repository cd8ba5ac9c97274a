"""The sampling parameters are listed once (common.sampling_params) and cross gRPC field by field."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from common import sampling_params
from common.sampling_fields import BY_NAME, SAMPLING_FIELDS
from common.sampling_params import SamplingParams
from facade import request_models
from protos import router_pb2 as router_pb
from protos import shard_pb2 as pb
from shard.runtime.errors import InvalidRequest
from shard.runtime.server import request_from_pb


def test_the_dataclass_and_the_message_have_the_same_fields():
    assert set(sampling_params.FIELDS) == {f.name for f in pb.SamplingParameters.DESCRIPTOR.fields}


def test_the_table_names_every_field_a_request_sets_in_both_protos():
    """Every field of the table is in SamplingParams and shard.proto under its name, and in
    router.proto's GenerationParameters under its router name; what is not in the table is
    what the router derives itself (the model's end tokens, the grammar)."""
    table = {f.name for f in SAMPLING_FIELDS}
    assert table == set(sampling_params.FIELDS) - {"eos_token_ids", "grammar"}
    router_fields = {f.name for f in router_pb.GenerationParameters.DESCRIPTOR.fields}
    assert {f.in_router for f in SAMPLING_FIELDS} <= router_fields


def test_the_request_models_take_their_bounds_from_the_table():
    """The facade's pydantic bounds (and so /openapi.json) are the table's ranges."""
    models = (request_models.ChatCompletionRequest, request_models.CompletionRequest,
              request_models.CreateResponse, request_models.GenerateParameters)  # fmt: skip
    checked = 0
    for model in models:
        for name, info in model.model_fields.items():
            if name not in BY_NAME or name in ("seed", "top_k"):  # any seed is taken mod 2^64; top_k -1 is off
                continue
            metadata = info.metadata
            if name == "logit_bias":  # the bounds are each bias's
                metadata = typing.get_args(typing.get_args(info.annotation)[0])[1].__metadata__[0].metadata
            bounds = {type(m).__name__.lower(): getattr(m, type(m).__name__.lower()) for m in metadata}
            spec = BY_NAME[name]
            uint32 = {"le": request_models.UINT32_MAX} if spec.kind is int and spec.high is None else {}
            assert bounds == spec.pydantic_bounds() | uint32, (model.__name__, name)
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [("top_p", 0.0, "top_p must be in (0, 1], got 0"), ("temperature", 2.5, "temperature must be in [0, 2], got 2.5"),
     ("repetition_penalty", 0.0, "repetition_penalty must be > 0, got 0"),
     ("min_p", 1.5, "min_p must be in [0, 1], got 1.5"), ("frequency_penalty", -2.0, None)],
)  # fmt: skip
def test_one_range_check_for_router_and_shard(name, value, message):
    spec = BY_NAME[name]
    assert spec.problem(value) == message
    problems = SamplingParams(**{name: value}).problems()
    assert problems == ([] if message is None else [message])


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
