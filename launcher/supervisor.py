"""Child processes that live and die together."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to the child if the launcher dies, even by
    # SIGKILL, so no service outlives it.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Supervisor:
    children: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.children[name] = subprocess.Popen(
            [sys.executable, *args], env=env, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL
        )

    def dead(self) -> tuple[str, int] | None:
        """A child that exited, with its exit code."""
        for name, child in self.children.items():
            code = child.poll()
            if code is not None:
                return name, code
        return None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM everyone, then SIGKILL whoever is still there after ``grace_s``."""
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children.values():
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
