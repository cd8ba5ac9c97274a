"""Typed reading of flags with environment fallbacks, shared by every process.

Each process builds one frozen config dataclass in its ``__main__`` from
``argparse`` flags whose defaults come from here; nothing reads the
environment at import time. Environment names follow TGI's so that a TGI
deployment's env block works unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def env_str(env: Mapping[str, str], *names: str, default: str | None = None) -> str | None:
    """The first of ``names`` set (non-empty) in ``env``, else ``default``."""
    for name in names:
        value = env.get(name)
        if value:
            return value
    return default


def env_int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    value = env_str(env, *names)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise SystemExit(f"{names[0]} must be an integer, got {value!r}") from exc


def env_float(env: Mapping[str, str], *names: str, default: float | None = None) -> float | None:
    value = env_str(env, *names)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise SystemExit(f"{names[0]} must be a number, got {value!r}") from exc


def process_env() -> Mapping[str, str]:
    """The environment, read when a process starts (never at import time)."""
    return dict(os.environ)
