"""Options for the gRPC channels between our services."""

from __future__ import annotations

#: Services start in any order and restart on their own; gRPC's default reconnect back-off
#: doubles up to two minutes, so a router that dialled its shard before the shard listened
#: sat idle for about 30 s after the shard was up, and a facade after the router did the
#: same. Retrying at least once a second costs nothing on a local network.
RECONNECT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
