"""The one-call decoder layer and layer stack (shard.numerics.native_layer): the very bits of the Python path.

A schedule with prefill steps, mixed steps (decode tokens and a prompt chunk in one forward:
two attention groups, queries in packed order) and decode steps runs three times on the same
engine through ``decoder_layer.c`` (the whole stack in one call, then layer by layer) and
through the Python path (``NativeStep.of`` patched to decline); every token, logprob and top
alternative must match, and each run must really have taken its path.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from common.model_source import resolve_model
from shard.numerics import model_forward, native_layer
from shard.numerics.decoder_layers import FastDecoderLayer
from shard.numerics.sampling import SamplingParams
from support.lora_adapters import ATTENTION, build_adapter
from tests.shard.engine_driver import Driver, Tracked, make_engine

PARAMS = SamplingParams(temperature=0.0, top_n_tokens=3)


def _schedule(engine, adapters: tuple[str, str] = ("", "")) -> list[tuple[list[int], list[float]]]:
    engine.clear(None)
    driver = Driver(engine)
    first = Tracked(1, [(37 * i + 11) % 4000 + 100 for i in range(30)], PARAMS, adapter=adapters[0])
    second = Tracked(2, [(13 * i + 5) % 4000 + 100 for i in range(41)], PARAMS, adapter=adapters[1])
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
    """float32; bf16 with 4-bit weights; Qwen2 (q/k/v biases); Mistral (sliding window). The
    whole stack in one call, each layer in one call, and the Python path: the same bits."""
    kind, dtype_name, quantize = case.split("-")
    engine = make_engine(resolve_model(str(tiny_model_dir(kind))), dtype=getattr(torch, dtype_name), quantize=quantize)
    stack_calls, layer_calls = [], []
    stack_forward, layer_forward = native_layer.NativeStack.forward, native_layer.NativeStep.forward

    def counted_stack(stack, step, x):
        stack_calls.append(x.shape[0])
        return stack_forward(stack, step, x)

    def counted_layer(step, layer, x):
        layer_calls.append(x.shape[0])
        return layer_forward(step, layer, x)

    with (
        mock.patch.object(native_layer.NativeStack, "forward", counted_stack),
        mock.patch.object(native_layer.NativeStep, "forward", counted_layer),
    ):
        stack = _schedule(engine)
        assert engine.runner._direct and engine.runner._direct._stack, "the stack was not built"
        assert stack_calls == [30, 1, 18, 25, 2, 2, 2, 2, 2, 2] and not layer_calls  # every step took it
        engine.runner._direct._stack = False  # layer by layer
        by_layer = _schedule(engine)
    layers = engine.model.config.num_hidden_layers
    assert len(layer_calls) == 10 * layers and set(layer_calls) == {30, 1, 18, 25, 2}
    with mock.patch.object(native_layer.NativeStep, "of", staticmethod(lambda *args: None)):
        python = _schedule(engine)
    assert stack == by_layer == python
    assert [len(tokens) for tokens, _ in stack] == [10, 7]


@pytest.mark.parametrize("case", ["llama-bfloat16-int4", "qwen2-float32-none"])
def test_lora_deltas_in_one_call_are_the_python_path_bit_for_bit(case, tiny_model_dir, tmp_path):
    """With LoRA adapters in the step (one request on an adapter, the other on another or on
    the base model), decoder_layer.c adds each product's deltas as FastDecoderLayer does."""
    kind, dtype_name, quantize = case.split("-")
    base = tiny_model_dir(kind)
    engine = make_engine(resolve_model(str(base)), dtype=getattr(torch, dtype_name), quantize=quantize)
    engine.load_adapter("x", str(build_adapter(base, tmp_path / "x", seed=4, rank=8)))
    engine.load_adapter("y", str(build_adapter(base, tmp_path / "y", seed=5, rank=4, targets=ATTENTION)))
    plain = _schedule(engine)
    for adapters in (("x", "y"), ("x", "")):
        stack = _schedule(engine, adapters)
        assert engine.runner._direct and engine.runner._direct._stack, "the stack was not built"
        engine.runner._direct._stack = False  # layer by layer
        by_layer = _schedule(engine, adapters)
        engine.runner._direct._stack = None  # built again at the next step
        with mock.patch.object(native_layer.NativeStep, "of", staticmethod(lambda *args: None)):
            python = _schedule(engine, adapters)
        assert stack == by_layer == python, adapters
        assert stack[0] != plain[0] and (stack[1] == plain[1]) == (adapters[1] == "")


@pytest.mark.parametrize("case", ["llama-bfloat16-int4", "qwen2-float32-none", "mistral-bfloat16-none"])
def test_the_direct_model_forward_is_transformers_forward_bit_for_bit(case, tiny_model_dir):
    """shard.numerics.model_forward against transformers' model forward, on the same engine and schedule."""
    kind, dtype_name, quantize = case.split("-")
    engine = make_engine(resolve_model(str(tiny_model_dir(kind))), dtype=getattr(torch, dtype_name), quantize=quantize)
    direct = ours = _schedule(engine)
    assert engine.runner._direct, "the direct path was not taken"
    engine.runner._direct = False
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
