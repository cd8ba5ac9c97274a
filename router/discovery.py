"""Which model replicas exist: the configured addresses, DNS names expanded, checked again and again.

``SHARD_ADDRESSES`` lists rank 0 of each replica: ``host:port``,
``unix:///path``, or ``dns:name:port`` for every address a DNS name resolves to
(a Kubernetes headless Service, or ``docker compose --scale shard=N`` whose
service name resolves to every container). The router starts serving once one
replica is warm; ``Discovery.run`` then looks again every few seconds, so a
replica that comes up later, or a new A record, joins without a restart.
Replicas that go away are the recovery's business: their requests move on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

#: How often the addresses are looked at again.
DISCOVERY_INTERVAL_S = 5.0
#: How long one attempt waits for a replica that is not up (it is tried again next round).
CONNECT_ATTEMPT_S = 2.0


async def resolve(entries: list[str]) -> list[str]:
    """The rank-0 addresses the entries name now (``dns:`` entries expanded, sorted)."""
    found: list[str] = []
    for entry in entries:
        if not entry.startswith("dns:"):
            found.append(entry)
            continue
        host, _, port = entry.removeprefix("dns:").lstrip("/").rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("%s does not resolve yet: %s", entry, exc)
            continue
        ips = sorted({str(info[4][0]) for info in infos})
        found += [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]
    return found


class Discovery:
    """Joins every address ``resolve`` finds that is not a replica yet, through ``join`` (which
    connects, warms and adds it; it raises when the replica is not reachable yet)."""

    def __init__(self, entries: list[str], join: Callable[[str], Awaitable[None]], known: set[str]):
        self.entries = entries
        self.join = join
        self.known = known

    async def tick(self) -> None:
        for address in await resolve(self.entries):
            if address in self.known:
                continue
            try:
                await self.join(address)
            except (TimeoutError, OSError, ConnectionError) as exc:
                log.debug("replica %s not reachable yet: %s", address, exc)
                continue
            except Exception as exc:  # a gRPC error, a different model: say it, try again later
                log.warning("replica %s could not join: %s", address, str(exc).splitlines()[0] if str(exc) else exc)
                continue
            self.known.add(address)

    async def run(self, interval_s: float = DISCOVERY_INTERVAL_S) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.tick()
