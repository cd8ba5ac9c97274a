"""The KV block allocator and prefix cache: which blocks of the shards' cache each request holds.

Plain Python, no tensors: the router decides, the shards write where told.

Prefix caching (chained block hashes, as nano-vllm and vLLM do): once a block
is full and its KV computed, it is registered under
``hash((hash of the previous block, its token ids))``. A later request whose
prompt starts with the same tokens takes those blocks instead of recomputing
them; every hit also compares the token ids, so a hash collision can never
serve wrong KV. Blocks nobody holds stay cached, least recently freed first
out, until their space is needed.

Invariants (``check``): a block's reference count equals the number of
requests holding it; a block is free iff its count is 0; ``free + used ==
total``; the hash map only points at blocks that hold exactly the tokens it
claims.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from router.errors import OutOfBlocks


@dataclass
class Block:
    id: int
    ref_count: int = 0
    #: Chained hash of this block's content; None until registered.
    hash: int | None = None
    #: Token ids whose KV it holds, once registered (checked on every hit).
    tokens: tuple[int, ...] = ()
    #: The chain hash it extends, or for a first block the chain's root (checked on every hit):
    #: None for the base model, the adapter's name for a LoRA adapter's KV.
    previous: int | str | None = None


#: Registration progress of one sequence: (full blocks registered, hash of the last one, or
#: the chain's root before the first).
Chain = tuple[int, int | str | None]
NEW_CHAIN: Chain = (0, None)


def chain_root(adapter: str) -> str | None:
    """Where a sequence's chain starts: two adapters (or an adapter and the base model) compute
    different KV for the same tokens, so their blocks are never shared."""
    return adapter or None


def chain_hash(previous: int | str | None, tokens: Sequence[int]) -> int:
    return hash((previous, tuple(tokens)))


def prefix_chain(token_ids: Sequence[int], block_size: int, adapter: str = "") -> list[int]:
    """The chain hashes of the full blocks ``match_prefix`` would look up (the last token excluded)."""
    hashes: list[int] = []
    previous: int | str | None = chain_root(adapter)
    for index in range((len(token_ids) - 1) // block_size):
        previous = chain_hash(previous, token_ids[index * block_size : (index + 1) * block_size])
        hashes.append(previous)
    return hashes


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first; cached ones keep their hash until reused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._by_hash: dict[int, int] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def cached_blocks(self) -> int:
        return len(self._by_hash)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # --- allocation -------------------------------------------------------------

    def allocate(self, count: int) -> list[int]:
        """``count`` fresh blocks (evicting cached ones, oldest first); all or nothing."""
        if count > len(self._free):
            raise OutOfBlocks(f"{count} blocks wanted, {len(self._free)} free")
        taken = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._forget(block)
            block.ref_count = 1
            taken.append(block_id)
        return taken

    def release(self, block_ids: Sequence[int]) -> None:
        """Drops one reference to each block; unreferenced blocks become free (and stay cached)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} released more often than held")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    # --- prefix cache -----------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int], adapter: str = "") -> tuple[list[int], Chain]:
        """Takes a reference on the cached blocks that hold a prefix of ``token_ids``.

        At least one token is always left uncached: the step that computes it
        produces the logits of the next token. Returns the blocks and the
        registration chain they amount to.
        """
        hits, previous = self._cached_prefix(token_ids, chain_root(adapter))
        for block_id in hits:
            self._hold(block_id)
        return hits, (len(hits), previous)

    def cached_prefix_blocks(self, chain: Sequence[int]) -> int:
        """How many leading blocks of a prompt (its chain hashes, ``prefix_chain``) are cached; no
        reference taken. For placement's estimate: a hash collision would only misplace."""
        count = 0
        for h in chain:
            if h not in self._by_hash:
                break
            count += 1
        return count

    def _cached_prefix(
        self, token_ids: Sequence[int], previous: int | str | None
    ) -> tuple[list[int], int | str | None]:
        size = self.block_size
        hits: list[int] = []
        for index in range((len(token_ids) - 1) // size):
            tokens = tuple(token_ids[index * size : (index + 1) * size])
            h = chain_hash(previous, tokens)
            block_id = self._by_hash.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens or self.blocks[block_id].previous != previous:
                break
            hits.append(block_id)
            previous = h
        return hits, previous

    def register(self, block_ids: Sequence[int], token_ids: Sequence[int], computed: int, chain: Chain) -> Chain:
        """Makes the full blocks among the first ``computed`` tokens findable by later requests.

        ``chain`` is how far this sequence was registered before (blocks, last
        hash), so each block is hashed once in a request's life.
        """
        size = self.block_size
        done, previous = chain
        for index in range(done, computed // size):
            block = self.blocks[block_ids[index]]
            tokens = tuple(token_ids[index * size : (index + 1) * size])
            h = chain_hash(previous, tokens)
            if block.hash is None and h not in self._by_hash:
                block.hash, block.tokens, block.previous = h, tokens, previous
                self._by_hash[h] = block.id
            previous = h
        return max(done, computed // size), previous

    def _hold(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self._by_hash.get(block.hash) == block.id:
            del self._by_hash[block.hash]
        block.hash, block.tokens, block.previous = None, (), None

    # --- invariants -------------------------------------------------------------

    def check(self, holders: dict[int, list[int]] | None = None) -> None:
        """Asserts the invariants; ``holders`` maps each request to the blocks it holds."""
        free = set(self._free)
        assert len(free) == len(self._free)
        for block in self.blocks:
            assert (block.ref_count == 0) == (block.id in free), f"block {block.id}: count vs free list"
            assert block.ref_count >= 0
        assert len(free) + sum(1 for b in self.blocks if b.ref_count > 0) == self.num_blocks
        for h, block_id in self._by_hash.items():
            block = self.blocks[block_id]
            assert block.hash == h and len(block.tokens) == self.block_size, f"hash map entry of block {block_id}"
        if holders is not None:
            counts = [0] * self.num_blocks
            for blocks in holders.values():
                assert len(set(blocks)) == len(blocks), "a request holds a block twice"
                for block_id in blocks:
                    counts[block_id] += 1
            for block in self.blocks:
                assert block.ref_count == counts[block.id], f"block {block.id}: {block.ref_count} != {counts[block.id]}"
