"""``python -m benchmarks.fake_shard``: a shard server whose model costs nothing.

It serves the real shard servicer over gRPC with ``tests.fake_engine.FakeEngine``
(no KV verification), so that a benchmark measures the router alone.
"""

from __future__ import annotations

import argparse
import asyncio

from shard.config import ShardConfig
from shard.server import ShardServicer, create_server
from tests.fake_engine import FakeEngine


async def serve(uds_path: str, num_blocks: int, block_size: int) -> None:
    engine = FakeEngine(num_blocks, block_size, max_positions=8192, verify=False)
    config = ShardConfig(None, None, "cpu", 0, 1, uds_path, None, block_size, 0.1)
    server = create_server(ShardServicer(engine, config, "fake", "FakeForCausalLM"), config.address)  # type: ignore[arg-type]
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--uds-path", required=True)
    p.add_argument("--num-blocks", type=int, default=65536)
    p.add_argument("--block-size", type=int, default=16)
    a = p.parse_args()
    asyncio.run(serve(a.uds_path, a.num_blocks, a.block_size))


if __name__ == "__main__":
    main()
