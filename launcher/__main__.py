"""``python -m launcher`` (``make serve``): shards, router and facade on this machine.

Starts one shard per rank, the router and the facade as separate processes
talking over Unix sockets, waits until ``/health`` answers, prints the URL, and
stops every process on Ctrl-C or SIGTERM. A process that dies once the stack is
up is restarted (the router re-warms a restarted shard and resumes its requests;
the facade reconnects to a restarted router); one that dies while starting, or
keeps dying, stops the stack.
Configuration is the services' own: TGI's environment variables (MODEL_ID,
MAX_TOTAL_TOKENS, ...) reach every child.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from types import FrameType

from common.ports import free_port
from common.settings import (
    ENVIRONMENT_ONLY,
    FACADE,
    LAUNCHER,
    ROUTER,
    SHARD,
    env_str,
    parser_for,
    process_env,
    read,
    settings_of,
)
from launcher.supervisor import CrashLoop, Supervisor


class Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def services_settings(env: Mapping[str, str]) -> str:
    """Every setting of the services the launcher starts (the table in common.settings), for ``--help``."""
    lines = ["settings of the services (environment variables reach every process started; in brackets):"]
    for service in (LAUNCHER, SHARD, ROUTER, FACADE):
        lines.append(f"\n  {service}:")
        for s in settings_of(service):
            value = read(env, s, s.default)
            now = "" if value in (None, "") else f" (now: {value})"
            lines.append(f"    {s.flag:<28} {s.help} [{' | '.join(s.env)}]{now}")
    lines.append("\n  every service, read from the environment only:")
    lines.extend(f"    [{names}] {meaning}" for names, meaning in ENVIRONMENT_ONLY)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env = process_env()
    p = parser_for(LAUNCHER, env, __doc__.splitlines()[0] if __doc__ else "")
    p.epilog = services_settings(env)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "role",
        nargs="?",
        choices=["all", "shards"],
        default="all",
        help="all: shards, router and facade (default); shards: only the ranks of one replica, over TCP "
        "(the docker compose shard service)",
    )
    return p.parse_args(argv)


def shard_threads(num_shard: int, env: Mapping[str, str]) -> list[str]:
    """``--threads`` for shards that share this host with the router and the facade: every core.

    Under load the shard is the only busy process, so a shard on one thread left the other
    core idle (docs/performance.md, "Shard threads"). (The
    old advice, one core left free, came from library GEMMs whose threads stalled at
    every barrier when preempted; our kernels split work over output tiles and the
    other services wake rarely.) SHARD_THREADS or OMP_NUM_THREADS override it.
    """
    if env_str(env, "SHARD_THREADS") or env_str(env, "OMP_NUM_THREADS"):
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ["--threads", str(max(1, cores // num_shard))]


def shard_prefixes(sockets: str, num_replicas: int) -> list[str]:
    """The Unix socket prefix of each model replica's shards (rank r listens on ``<prefix>-r``)."""
    if num_replicas == 1:
        return [os.path.join(sockets, "shard")]
    return [os.path.join(sockets, f"replica{i}-shard") for i in range(num_replicas)]


def start_services(args: argparse.Namespace, supervisor: Supervisor, sockets: str) -> None:
    model = ["--model-id", args.model_id] if args.model_id else []
    prefixes = shard_prefixes(sockets, args.num_replicas)
    router_socket = f"unix://{os.path.join(sockets, 'router.sock')}"
    threads = shard_threads(args.num_shard * args.num_replicas, process_env())
    for replica, prefix in enumerate(prefixes):
        # The ranks of one replica restart together (a tensor-parallel group); replicas independently.
        group = "shards" if args.num_replicas == 1 else f"replica{replica}"
        rendezvous = ["--master-port", str(free_port())] if args.num_shard > 1 else []
        for rank in range(args.num_shard):
            shard = ["-m", "shard", *model, *threads, "--uds-path", prefix, "--rank", str(rank)]
            name = f"shard-{rank}" if args.num_replicas == 1 else f"replica{replica}-shard-{rank}"
            supervisor.start(name, [*shard, "--world-size", str(args.num_shard), *rendezvous], group=group)
    entries = ",".join(f"unix://{prefix}-0" for prefix in prefixes)
    supervisor.start("router", ["-m", "router", *model, "--listen", router_socket, "--shard-addresses", entries])
    facade = ["-m", "facade", "--hostname", args.hostname, "--port", str(args.port), "--router", router_socket]
    supervisor.start("facade", facade)


def start_shards_over_tcp(args: argparse.Namespace, supervisor: Supervisor) -> None:
    """All ranks of one model replica, rank r on port base + r.

    The router reaches the other ranks at the host rank 0 advertises: SHARD_ADVERTISE_HOST, else
    this machine's host name (a container's, which its network resolves: so replicas scaled with
    ``docker compose --scale shard=N`` each advertise themselves).
    """
    model = ["--model-id", args.model_id] if args.model_id else []
    host, port = args.shard_listen.rsplit(":", 1)
    rendezvous = ["--master-port", str(free_port())] if args.num_shard > 1 else []
    advertise = [] if env_str(process_env(), "SHARD_ADVERTISE_HOST") else ["--advertise-host", socket.gethostname()]
    for rank in range(args.num_shard):
        listen = f"{host}:{int(port) + rank}"
        shard = ["-m", "shard", *model, "--listen", listen, "--rank", str(rank), "--world-size", str(args.num_shard)]
        supervisor.start(f"shard-{rank}", [*shard, *advertise, *rendezvous], group="shards")


def wait_ready(url: str, supervisor: Supervisor, timeout_s: float, phase: Callable[[], str]) -> None:
    """Polls ``/health``; says which phase the start is in whenever it changes, and every 10 s."""
    started = time.monotonic()
    last_note, last_phase = 0.0, ""
    while True:
        dead = supervisor.dead()
        if dead:
            raise SystemExit(f"switchyard: {dead[0]} exited with code {dead[1]} while starting")
        told = None
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as answer:  # the facade is up: its 503 says what the router is doing
            told = _not_ready_reason(answer)
        except (urllib.error.URLError, OSError):
            pass
        waited = time.monotonic() - started
        now_phase = told or phase()
        if waited > timeout_s:
            raise SystemExit(f"switchyard: not healthy after {timeout_s:.0f}s ({now_phase})")
        if now_phase != last_phase or waited - last_note >= 10:
            _say(f"switchyard: {now_phase} ({waited:.0f}s)")
            last_note, last_phase = waited, now_phase
        time.sleep(0.2)


def _not_ready_reason(answer: urllib.error.HTTPError) -> str | None:
    """The sentence of a 503 from /health ("not ready: warming up the shards" -> "warming up the shards")."""
    try:
        message = json.loads(answer.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return None
    return str(message).removeprefix("not ready: ")


def start_phase(sockets: str, num_shard: int, num_replicas: int = 1) -> Callable[[], str]:
    """The phase of a start before the facade answers, read off which shards listen on their sockets yet."""
    paths = [f"{prefix}-{r}" for prefix in shard_prefixes(sockets, num_replicas) for r in range(num_shard)]

    def phase() -> str:
        listening = [os.path.exists(path) for path in paths]
        if not all(listening):
            return f"loading the model ({sum(listening)}/{len(paths)} shards up)"
        return "starting the router and the HTTP facade"

    return phase


def _say(message: object) -> None:
    print(message, file=sys.stderr, flush=True)


def supervise(
    start: Callable[[Supervisor], None],
    ready_url: str | None,
    timeout_s: float,
    phase: Callable[[], str] = lambda: "starting",
) -> int:
    """Starts the children, (waits until ready_url answers), then restarts any that dies until a signal."""
    supervisor = Supervisor(say=_say)
    try:
        start(supervisor)
        if ready_url:
            wait_ready(ready_url, supervisor, timeout_s, phase)
            _say(f"switchyard: ready. OpenAI API at {ready_url}/v1/ (Ctrl-C stops)")
        while True:
            supervisor.restart_dead()
            time.sleep(0.1)
    except CrashLoop as why:
        _say(f"switchyard: {why}; stopping")
        return 1
    except Interrupted as why:
        _say(f"switchyard: {why}, stopping")
        return 0
    except SystemExit as exc:
        _say(exc)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        supervisor.stop()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if args.role == "shards":
        sys.exit(supervise(lambda sup: start_shards_over_tcp(args, sup), None, args.ready_timeout))
    host = "127.0.0.1" if args.hostname in ("0.0.0.0", "::") else args.hostname
    with tempfile.TemporaryDirectory(prefix="switchyard-") as sockets:
        code = supervise(
            lambda sup: start_services(args, sup, sockets),
            f"http://{host}:{args.port}",
            args.ready_timeout,
            start_phase(sockets, args.num_shard, args.num_replicas),
        )
    sys.exit(code)


if __name__ == "__main__":
    main()
