from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from common.model_source import resolve_model
from common.ports import free_port
from router.tokenization import Tokenizer
from support.gguf_files import build_tiny_gguf
from support.tiny_models import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def build(kind: str) -> Path:
        if kind not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{kind}")
            # "gguf": a llama-shaped GGUF file with every stored GGUF type (support.gguf_files)
            built[kind] = build_tiny_gguf(folder).parent if kind == "gguf" else build_tiny_model(kind, folder)
        return built[kind]

    return build


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir) -> Tokenizer:
    """SmolLM2's tokenizer and chat template, as saved with the tiny models."""
    return Tokenizer.load(resolve_model(str(tiny_model_dir("llama"))))


@contextmanager
def running_stack(env_overrides: dict[str, str], timeout_s: float = 240.0) -> Iterator[str]:
    """Runs ``python -m launcher`` (shard, router, facade processes); yields the base URL."""
    with launched_stack(env_overrides, timeout_s) as (url, _):
        yield url


@contextmanager
def launched_stack(env_overrides: dict[str, str], timeout_s: float = 240.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Like ``running_stack``, also yielding the launcher process."""
    port = free_port()
    env = {**os.environ, "DTYPE": "float32", "MAX_BATCH_TOTAL_TOKENS": "16384", **env_overrides}
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"switchyard-stack-{port}.log"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "--port", str(port), "--hostname", "127.0.0.1"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, log, timeout_s)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise


def _wait_healthy(url: str, proc: subprocess.Popen, log, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the stack exited with {proc.returncode}:\n{log.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    log.seek(0)
    raise RuntimeError(f"the stack did not become healthy:\n{log.read()[-4000:]}")
