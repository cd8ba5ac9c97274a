"""Compiled decode steps: the model's forward through torch.compile (inductor), for pure decode steps.

Why: after int4 weights and the C attention kernel, a one-sequence decode step
on CPU spends about half its time dispatching ~3,000 small eager ops (norms,
rotary embeddings, activations, residual adds). Inductor fuses them into a few
C++ loops, and the step's result (float32 logits, their max and logsumexp: see
``LogitStats``) into one pass over the logits. Measured on this machine (SmolLM2,
bf16, int4 small steps, C attention): one sequence about 20 -> 15 ms per step,
64 sequences about 98 -> 87 ms. (Parameters stay inputs of the graph, so
``freezing`` does not prepack the bf16 weights here: ``shard.packed_linear`` does.)

Only steps made of decode tokens alone use it (they are most steps and all of
the per-token cost); prefill and mixed steps run eagerly, so the compiled graph
sees one shape family. ``dynamic=True`` makes the batch size and context length
symbolic; dynamo still specialises a batch of 1 and the int4/bf16 branch of
each linear, so ``warm`` compiles those variants at Warmup, before any request.
The price is startup time: about 35 s per variant on 2 cores.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from shard.quantization import DEFAULT_MAX_ROWS

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
#: Decode batch sizes that reach distinct graphs: 1 (specialised), small (int4 linears), large (bf16).
WARM_BATCHES = (1, 2, DEFAULT_MAX_ROWS + 1)


def wants_compile(mode: str, device: torch.device, dtype: torch.dtype, world_size: int) -> bool:
    """``auto``: on a CPU serving bf16 from one shard. Not in float32 (asked for to reproduce
    transformers exactly, as the tests do), not yet on CUDA (CUDA graphs are the plan there)."""
    if mode not in MODES:
        raise ValueError(f"COMPILE must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    return device.type == "cpu" and dtype == torch.bfloat16 and world_size == 1


class CompiledDecode:
    """The compiled forward. Only variants compiled at Warmup ever run: a step that would
    need a new variant runs eagerly instead of stalling every request for a compile."""

    def __init__(self, model: PreTrainedModel, finish: Callable[[Any], Any]):
        """``finish`` turns the model's output into the step's result; it runs inside the graph."""
        self.eager = model
        self.finish = finish
        # Dynamo checks guards before every call; by default they cover every module attribute
        # and parameter of the model (~1.5 ms per step here, a tenth of a one-sequence step).
        # The model never changes after loading, so those guards are dropped; guards on the
        # inputs (shapes, the paged step's metadata) stay. Dynamo keeps compiled graphs per code
        # object, so the model is called from a function with its own code object: no other
        # model's graphs (another engine in the same process) can match this one's inputs.
        options: dict[str, Any] = {
            "freezing": True,
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        }
        self.compiled = torch.compile(_own_entry(model, finish), dynamic=True, options=options)
        self.warming = False
        #: Decode steps served by a compiled graph, and by the eager fallback.
        self.compiled_steps = 0
        self.eager_steps = 0

    def __call__(self, **inputs: Any) -> Any:
        if self.warming:
            return self.compiled(**inputs)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                out = self.compiled(**inputs)
            self.compiled_steps += 1
            return out
        except RuntimeError as error:  # raised by the guard check, before the graph runs
            if "recompile" not in str(error):
                raise
            if not self.eager_steps:
                log.warning("a decode step needed a graph not compiled at Warmup; such steps run eagerly")
            self.eager_steps += 1
            return self.finish(self.eager(**inputs))

    def warm(self, decode_probe: Callable[[int], None], max_batch: int) -> bool:
        """Compiles each variant by running a probe decode step of that batch size; False if compiling fails."""
        batches = sorted({min(b, max_batch) for b in WARM_BATCHES})
        log.info(
            "compiling the decode step for batch sizes %s (once per start, ~35 s each on 2 cores; COMPILE=off skips)",
            batches,
        )
        self.warming = True
        try:
            for batch in batches:
                started = time.monotonic()
                decode_probe(batch)
                log.info("compiled the decode step for batch %d in %.1f s", batch, time.monotonic() - started)
        except Exception as error:  # inductor needs a C++ compiler and may meet an op it cannot lower
            log.warning("compiling the decode step failed (%s): decode steps run eagerly", error)
            return False
        finally:
            self.warming = False
        return True


def _own_entry(model: PreTrainedModel, finish: Callable[[Any], Any]) -> Callable[..., Any]:
    """``finish(model(**inputs))`` as a function whose code object belongs to this model alone."""

    def forward(**inputs: Any) -> Any:
        return finish(model(**inputs))

    code = forward.__code__.replace(co_name=f"decode_step_{id(model):x}")
    return types.FunctionType(code, forward.__globals__, code.co_name, None, forward.__closure__)
