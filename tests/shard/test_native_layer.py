"""The one-call decoder layer (shard.native_layer): the very bits of the layer's Python path.

A schedule with prefill steps, mixed steps (decode tokens and a prompt chunk in one forward:
two attention groups, queries in packed order) and decode steps runs twice on the same
engine, once through ``decoder_layer.c`` and once through the Python path
(``NativeStep.of`` patched to decline); every token, logprob and top alternative must match,
and the first run must really have taken the one-call path.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from common.model_source import resolve_model
from shard import model_forward, native_layer
from shard.decoder_layers import FastDecoderLayer
from shard.sampling import SamplingParams
from tests.shard.engine_driver import Driver, Tracked, make_engine

PARAMS = SamplingParams(temperature=0.0, top_n_tokens=3)


def _schedule(engine) -> list[tuple[list[int], list[float]]]:
    engine.clear(None)
    driver = Driver(engine)
    first = Tracked(1, [(37 * i + 11) % 4000 + 100 for i in range(30)], PARAMS)
    second = Tracked(2, [(13 * i + 5) % 4000 + 100 for i in range(41)], PARAMS)
    driver.prefill([(first, 30)])
    driver.decode()
    driver.decode([(second, 17)])  # mixed: first decodes, second's first chunk
    driver.decode([(second, 24)])  # mixed: the chunk that ends second's prompt
    for _ in range(6):  # past the Mistral window of 24
        driver.decode()
    return [(t.tokens, t.logprobs) for t in (first, second)]


@pytest.mark.parametrize(
    "case", ["llama-float32-none", "llama-bfloat16-int4", "qwen2-bfloat16-none", "mistral-float32-none"]
)
def test_one_call_layer_is_the_python_path_bit_for_bit(case, tiny_model_dir):
    """float32; bf16 with 4-bit weights; Qwen2 (q/k/v biases); Mistral (sliding window)."""
    kind, dtype_name, quantize = case.split("-")
    engine = make_engine(resolve_model(str(tiny_model_dir(kind))), dtype=getattr(torch, dtype_name), quantize=quantize)
    calls = []
    forward = native_layer.NativeStep.forward

    def counted(step, layer, x):
        calls.append(x.shape[0])
        return forward(step, layer, x)

    with mock.patch.object(native_layer.NativeStep, "forward", counted):
        ours = _schedule(engine)
    layers = engine.model.config.num_hidden_layers
    assert len(calls) == 10 * layers and set(calls) == {30, 1, 18, 25, 2}  # every step took it
    with mock.patch.object(native_layer.NativeStep, "of", staticmethod(lambda *args: None)):
        python = _schedule(engine)
    assert ours == python
    assert [len(tokens) for tokens, _ in ours] == [10, 7]


@pytest.mark.parametrize("case", ["llama-bfloat16-int4", "qwen2-float32-none", "mistral-bfloat16-none"])
def test_the_direct_model_forward_is_transformers_forward_bit_for_bit(case, tiny_model_dir):
    """shard.model_forward against transformers' model forward, on the same engine and schedule."""
    kind, dtype_name, quantize = case.split("-")
    engine = make_engine(resolve_model(str(tiny_model_dir(kind))), dtype=getattr(torch, dtype_name), quantize=quantize)
    direct = ours = _schedule(engine)
    assert engine._direct, "the direct path was not taken"
    engine._direct = False
    transformers_forward = _schedule(engine)
    assert direct == transformers_forward
    assert [len(tokens) for tokens, _ in ours] == [10, 7]


def test_the_direct_model_forward_declines_other_models():
    class GemmaForCausalLM(torch.nn.Module):  # embeddings scaled: transformers' forward must run
        pass

    assert model_forward.DirectForward.of(GemmaForCausalLM()) is None


def test_default_model_layers_take_the_one_call_path():
    """SmolLM2 as served (bf16, GGUF weights): every layer fits the driver."""
    engine = make_engine(resolve_model(None), dtype=torch.bfloat16, quantize="auto")
    layers = [m for m in engine.model.modules() if isinstance(m, FastDecoderLayer)]
    assert layers and all(layer.native_layer() is not None for layer in layers)
