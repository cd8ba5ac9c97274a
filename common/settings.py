"""Typed reading of flags with environment fallbacks, shared by every process.

Each process builds one frozen config dataclass in its ``__main__`` from
``argparse`` flags whose defaults come from here; nothing reads the
environment at import time. Environment names follow TGI's so that a TGI
deployment's env block works unchanged.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any


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


def env_option(
    p: argparse.ArgumentParser,
    env: Mapping[str, str],
    flag: str,
    *names: str,
    kind: type = str,
    default: Any = None,
    help: str = "",
    **extra: Any,
) -> None:
    """A flag whose default is the first of the environment ``names`` set (else ``default``); its help
    ends with those names, so ``--help`` (and the launcher's) always says which variable sets it."""
    value: Any
    if kind is int:
        value = env_int(env, *names, default=default)
    elif kind is float:
        value = env_float(env, *names, default=default)
    else:
        value = env_str(env, *names, default=default)
    if kind is not str:
        extra["type"] = kind
    p.add_argument(flag, default=value, help=f"{help} [{' | '.join(names)}]".lstrip(), **extra)


def process_env() -> Mapping[str, str]:
    """The environment, read when a process starts (never at import time)."""
    return dict(os.environ)
