"""Child processes, restarted when they die once the stack is up."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_PR_SET_PDEATHSIG = 1

#: A service that died this many times within CRASH_LOOP_WINDOW_S is broken, not unlucky: the stack stops.
CRASH_LOOP_RESTARTS = 5
CRASH_LOOP_WINDOW_S = 120.0
#: Pause before the n-th restart in a row: FIRST * 2**(n-1), at most MAX (a crash loop must not spin).
FIRST_RESTART_DELAY_S = 0.25
MAX_RESTART_DELAY_S = 8.0


def _die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to the child if the launcher dies, even by
    # SIGKILL, so no service outlives it.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class CrashLoop(Exception):
    """A service keeps dying right after each restart."""


@dataclass
class Service:
    name: str
    args: list[str]
    env: dict[str, str] | None
    #: Services restarted together with this one (the ranks of one tensor-parallel replica
    #: share collectives: a rank alone cannot rejoin the others).
    group: str
    process: subprocess.Popen | None = None
    deaths: list[float] = field(default_factory=list)


@dataclass
class Supervisor:
    services: dict[str, Service] = field(default_factory=dict)
    #: Called with a line for the operator on every restart.
    say: Callable[[str], None] = print

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None, group: str | None = None) -> None:
        service = Service(name, args, env, group or name)
        self.services[name] = service
        self._spawn(service)

    @staticmethod
    def _spawn(service: Service) -> None:
        service.process = subprocess.Popen(
            [sys.executable, *service.args], env=service.env, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL
        )

    @property
    def children(self) -> dict[str, subprocess.Popen]:
        return {name: s.process for name, s in self.services.items() if s.process is not None}

    def dead(self) -> tuple[str, int] | None:
        """A child that exited, with its exit code."""
        for name, child in self.children.items():
            code = child.poll()
            if code is not None:
                return name, code
        return None

    def restart_dead(self) -> None:
        """Restarts every service that exited (with its group); raises CrashLoop for one that keeps dying."""
        while (dead := self.dead()) is not None:
            name, code = dead
            service = self.services[name]
            now = time.monotonic()
            service.deaths = [t for t in service.deaths if now - t < CRASH_LOOP_WINDOW_S] + [now]
            if len(service.deaths) >= CRASH_LOOP_RESTARTS:
                raise CrashLoop(f"{name} exited {len(service.deaths)} times within {CRASH_LOOP_WINDOW_S:.0f}s")
            group = [s for s in self.services.values() if s.group == service.group]
            others = [s.name for s in group if s is not service]
            with_others = f" with {', '.join(others)}" if others else ""
            self.say(f"switchyard: {name} exited with code {code}; restarting it{with_others}")
            self._stop_group([s.process for s in group if s.process is not None], grace_s=10.0)
            time.sleep(min(MAX_RESTART_DELAY_S, FIRST_RESTART_DELAY_S * 2 ** (len(service.deaths) - 1)))
            for member in group:
                self._spawn(member)

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
