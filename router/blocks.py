"""The KV block allocator: which blocks of the shards' cache each request owns.

Plain Python, no tensors: the router decides, the shards write where told.
Invariant (``check``): every block is either free or owned by exactly one
holder, and ``free + used == total``.
"""

from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[int, int] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return len(self._owner)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, owner: int, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"{count} blocks wanted, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._owner[block] = owner
        return blocks

    def free(self, owner: int, blocks: list[int]) -> None:
        for block in blocks:
            if self._owner.get(block) != owner:
                raise RuntimeError(f"block {block} freed by {owner} but owned by {self._owner.get(block)}")
            del self._owner[block]
            self._free.append(block)

    def check(self) -> None:
        assert len(self._free) + len(self._owner) == self.num_blocks, "free + used != total"
        assert len(set(self._free)) == len(self._free), "a block is free twice"
        assert not set(self._free) & set(self._owner), "a block is both free and owned"
