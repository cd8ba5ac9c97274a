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

    def stop(self, grace_s: float = 70.0, first: tuple[str, ...] = ("facade", "router")) -> None:
        """Stops the ``first`` services, then the rest, each group SIGTERM then SIGKILL after ``grace_s``.

        Front to back: the facade and router drain their in-flight requests while
        the shards they need are still there.
        """
        front = [c for name, c in self.children.items() if name in first]
        back = [c for name, c in self.children.items() if name not in first]
        for group in (front, back):
            self._stop_group(group, grace_s)

    @staticmethod
    def _stop_group(children: list[subprocess.Popen], grace_s: float) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in children:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
