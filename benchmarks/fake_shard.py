"""``python -m benchmarks.fake_shard``: a shard server whose model costs nothing, or a known cost.

It serves the real shard servicer over gRPC with ``support.fake_engine.FakeEngine``
(no KV verification), so that a benchmark measures the router alone; with
``--step-ms`` / ``--token-ms`` each step sleeps as a model of that cost would
compute (a fixed cost per step plus a cost per token computed: prompt chunks
and decodes), so that placement policies can be compared by what they save.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from shard.config import ShardConfig
from shard.runtime.batch_state import Sequence as ShardSequence
from shard.runtime.engine import Generation
from shard.runtime.server import ShardServicer, create_server
from support.fake_engine import FakeEngine


class TimedEngine(FakeEngine):
    """A FakeEngine whose steps take ``step_s + token_s * tokens computed`` (on the model thread)."""

    def __init__(self, num_blocks: int, block_size: int, step_s: float, token_s: float):
        super().__init__(num_blocks, block_size, max_positions=8192, verify=False)
        self.step_s, self.token_s = step_s, token_s

    def _run(self, work: list[tuple[ShardSequence, int]]) -> list[Generation]:
        if work:
            time.sleep(self.step_s + self.token_s * sum(n for _, n in work))
        return super()._run(work)


async def serve(uds_path: str, num_blocks: int, block_size: int, step_ms: float = 0.0, token_ms: float = 0.0) -> None:
    engine = TimedEngine(num_blocks, block_size, step_ms / 1000, token_ms / 1000)
    config = ShardConfig(None, None, "cpu", 0, 1, uds_path, None, block_size, 0.1)
    server = create_server(ShardServicer(engine, config, "fake", "FakeForCausalLM"), config.address)  # type: ignore[arg-type]
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--uds-path", required=True)
    p.add_argument("--num-blocks", type=int, default=65536)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--step-ms", type=float, default=0.0, help="cost of every step")
    p.add_argument("--token-ms", type=float, default=0.0, help="cost of every token computed in a step")
    a = p.parse_args()
    asyncio.run(serve(a.uds_path, a.num_blocks, a.block_size, a.step_ms, a.token_ms))


if __name__ == "__main__":
    main()
