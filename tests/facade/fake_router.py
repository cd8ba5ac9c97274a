"""A router stand-in for facade tests: any RouterServicer, served on a Unix socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

from protos import router_pb2_grpc as pb_grpc


@asynccontextmanager
async def serving(servicer: pb_grpc.RouterServicer, folder: Path) -> AsyncIterator[tuple[str, grpc.aio.Server]]:
    """Yields the socket address and the server (tests stop it to play a router that dies)."""
    address = f"unix://{folder / 'router.sock'}"
    server = grpc.aio.server()
    pb_grpc.add_RouterServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    await server.start()
    try:
        yield address, server
    finally:
        await server.stop(None)
