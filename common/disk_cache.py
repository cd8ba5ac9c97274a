"""Where the services keep what they derive from the weights and the host, across starts.

Everything under ``SWITCHYARD_CACHE`` (default ``~/.cache/switchyard``) is keyed by
all it depends on, so a stale entry is never read: another key is simply
computed and the entry rebuilt. Compose mounts this folder as a volume so that a
container restart finds it too. The folder is trusted like the code itself (the
prepared models in it are pickled modules): never point it at a folder that
others can write.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

SHARD_PACKAGE = Path(__file__).parent.parent / "shard"


def cache_root() -> Path:
    return Path(os.environ.get("SWITCHYARD_CACHE") or Path.home() / ".cache" / "switchyard")


@functools.cache
def host_fingerprint() -> str:
    """The CPU's model and instruction-set flags: code built with -march=native and
    weights packed for its vector width are only valid on the same kind of CPU."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()}|{model}|{flags}"


@functools.cache
def code_fingerprint() -> str:
    """A digest of the shard's own source (Python and C): a change of code rebuilds."""
    files = sorted(p for p in SHARD_PACKAGE.rglob("*") if p.suffix in {".py", ".c", ".h"})
    return digest(f"{p.relative_to(SHARD_PACKAGE)}\0{p.read_text()}" for p in files)


def digest(parts: Iterable[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def file_identity(path: Path) -> str:
    """Name, size and modification time: cheap, and changed by any rewrite of the file."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


@contextmanager
def written_atomically(target: Path, suffix: str) -> Iterator[Path]:
    """A scratch path beside ``target``, renamed onto it if the block succeeds, removed if not.

    The rename is atomic: a crash, or a concurrent start writing the same entry (tensor-parallel
    ranks, two stacks), never leaves a half-written file under the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=suffix, delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        yield partial
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
