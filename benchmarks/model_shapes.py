"""Random-weight models with the shapes of the models our users serve, as the GGUF files they download.

Speed depends on a model's shape and storage format, not on its weights' values, and
no weights can be downloaded here: so each shape is built from its config (written
here, from the models' published configs), with weights drawn by the config's own
initializer and SmolLM2's tokenizer (which we ship), saved in transformers' layout,
converted with llama.cpp's own ``convert_hf_to_gguf.py`` and quantized with its
``llama-quantize`` (the llama.cpp source the peers build, ``benchmarks.peers``). Built
once under ``build/models`` and kept. The text such a model writes is noise: the
benchmarks ask for fixed lengths (``ignore_eos``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from benchmarks import served
from support.tiny_models import smollm_tokenizer

MODELS = served.ROOT / "build" / "models"
_VOCAB = 49152  # SmolLM2's tokenizer; the real models' vocabularies are larger (their heads too)


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


#: The published shapes (hidden size, layers, heads, KV heads, MLP width, rope, tied head).
SHAPES: dict[str, PretrainedConfig] = {
    "llama1b": LlamaConfig(
        vocab_size=_VOCAB, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, rope_parameters=_rope(5e5), max_position_embeddings=8192, tie_word_embeddings=True,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    ),
    # Qwen2.5-3B's shape as a llama-architecture model (its q/k/v biases, 0.1% of the work, left
    # out): llama.cpp's converter refuses SmolLM2's tokenizer under the Qwen2 architecture (it
    # checks the pre-tokenizer's hash there), and the speed depends on the shape, not the name.
    "qwen3b": LlamaConfig(
        vocab_size=_VOCAB, hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
        intermediate_size=11008, rope_parameters=_rope(1e6), max_position_embeddings=8192, tie_word_embeddings=True,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    ),
    "llama8b": LlamaConfig(
        vocab_size=_VOCAB, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, rope_parameters=_rope(5e5), max_position_embeddings=8192, tie_word_embeddings=False,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    ),
}  # fmt: skip
QUANTIZATIONS = ("Q4_K_M", "Q4_0", "Q5_K_M", "Q6_K", "Q8_0")


def _run(argv: list[str], cwd: Path | None = None) -> None:
    print("  $", " ".join(argv), flush=True)
    subprocess.run(argv, cwd=cwd, check=True)


def hf_folder(shape: str) -> Path:
    """The shape's random-weight model in transformers' layout (bf16 safetensors), built once."""
    folder = MODELS / shape / "hf"
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(SHAPES[shape], dtype=torch.bfloat16)  # the config's initializer
    partial = folder.with_name("hf.partial")
    model.save_pretrained(partial)
    smollm_tokenizer().save_pretrained(partial)
    partial.rename(folder)
    return folder


def gguf_file(shape: str, quantization: str, llama_cpp: Path) -> Path:
    """``build/models/<shape>/<shape>-<quantization>.gguf``, converted and quantized with llama.cpp's tools."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}")
    target = MODELS / shape / f"{shape}-{quantization}.gguf"
    if target.exists():
        return target
    f16 = MODELS / shape / f"{shape}-F16.gguf"
    if not f16.exists():
        _run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(hf_folder(shape)), "--outtype", "f16",
              "--outfile", str(f16)])  # fmt: skip
    partial = target.with_suffix(".partial")
    _run([str(llama_cpp / "build" / "bin" / "llama-quantize"), str(f16), str(partial), quantization])
    partial.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("quantization", choices=QUANTIZATIONS)
    args = parser.parse_args()
    from benchmarks.peers import setup_llama_cpp

    server = setup_llama_cpp()
    print(gguf_file(args.shape, args.quantization, server.parent.parent.parent))


if __name__ == "__main__":
    main()
