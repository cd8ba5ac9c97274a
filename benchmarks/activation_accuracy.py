"""What int8 activations (QUANTIZED_ACTIVATIONS) cost in accuracy, on the default model.

The model's GGUF layers run on the served kernels (their own blocks, the step-invariant linear
kernel) inside transformers' own forward, once with float activations and once with int8 ones, over
the same text, teacher-forced: every position's next-token distribution is compared. Reported:
perplexity of each on the text, how often their top tokens agree, the mean KL divergence of the
int8 distributions from the float ones. The text is this repository's own documentation, so no
download is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.model_source import ModelSource, resolve_model
from shard.loading.gguf_storage import gguf_linear_storage
from shard.loading.model_loader import gguf_reader
from shard.numerics.invariant_linear import make_linears_invariant, quantize_activations
from shard.numerics.quantization import plan_storage

ROOT = Path(__file__).resolve().parents[1]
TEXT_FILES = ("README.md", "docs/reproducibility.md")
TOKENS = 1024
WINDOW = 512


@dataclass(frozen=True)
class Accuracy:
    tokens: int
    perplexity_float: float
    perplexity_int8: float
    top1_agreement: float
    mean_kl: float


def _served_model(source: ModelSource) -> torch.nn.Module:
    """transformers' model of the file, its linears on the served kernels as its own blocks."""
    model = AutoModelForCausalLM.from_pretrained(source.path_or_id, **source.pretrained_kwargs(), dtype=torch.float32)
    model.eval()
    blocks = gguf_linear_storage(model, gguf_reader(source))
    make_linears_invariant(model, plan_storage(model, "auto", torch.float32, decided=blocks))
    return model


def _log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[tokens - 1, vocab] log-probabilities of each next token, in windows of WINDOW tokens."""
    parts = []
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, WINDOW):
            window = ids[start : start + WINDOW + 1]
            logits = model(window[None, :-1]).logits[0].float()
            parts.append(torch.log_softmax(logits, dim=-1))
    return torch.cat(parts)


def run() -> Accuracy:
    source = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(source.path_or_id, **source.pretrained_kwargs())
    text = "\n\n".join((ROOT / name).read_text() for name in TEXT_FILES)
    ids = torch.tensor(tokenizer(text)["input_ids"][: TOKENS + 1])
    model = _served_model(source)
    exact = _log_probs(model, ids)
    quantize_activations(model)  # the same model, switched in place
    int8 = _log_probs(model, ids)
    targets = ids[1 : 1 + exact.shape[0]]
    kl = (exact.exp() * (exact - int8)).sum(dim=-1)
    return Accuracy(
        tokens=int(targets.numel()),
        perplexity_float=float(torch.exp(-exact.gather(1, targets[:, None]).mean())),
        perplexity_int8=float(torch.exp(-int8.gather(1, targets[:, None]).mean())),
        top1_agreement=float((exact.argmax(-1) == int8.argmax(-1)).float().mean()),
        mean_kl=float(kl.mean()),
    )


def report(a: Accuracy) -> str:
    return (
        f"int8 activations on the default model, {a.tokens} tokens of this repository's docs, teacher-forced: "
        f"perplexity {a.perplexity_float:.2f} (float) against {a.perplexity_int8:.2f} (int8); top tokens agree at "
        f"{a.top1_agreement:.1%} of positions; mean KL divergence {a.mean_kl:.4f} nats"
    )


if __name__ == "__main__":
    print(report(run()))
