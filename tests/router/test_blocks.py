"""The block allocator and prefix cache, driven by a hypothesis state machine."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from router.blocks import NEW_CHAIN, BlockAllocator
from router.errors import OutOfBlocks

BLOCK = 4


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.allocator = BlockAllocator(16, BLOCK)
        self.holders: dict[int, tuple[list[int], list[int]]] = {}  # id -> (blocks, tokens)
        self.next_id = 0

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=30))
    def arrive(self, tokens):
        blocks, chain = self.allocator.match_prefix(tokens)
        cached = len(blocks) * BLOCK
        assert cached < len(tokens), "at least one token must be left to compute"
        for i, block_id in enumerate(blocks):  # a hit holds exactly these tokens
            assert self.allocator.blocks[block_id].tokens == tuple(tokens[i * BLOCK : (i + 1) * BLOCK])
        try:
            blocks += self.allocator.allocate(self.allocator.blocks_for(len(tokens)) - len(blocks))
        except OutOfBlocks:
            self.allocator.release(blocks)
            return
        self.allocator.register(blocks, tokens, len(tokens), chain)
        self.holders[self.next_id] = (blocks, tokens)
        self.next_id += 1

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def finish(self, data):
        key = data.draw(st.sampled_from(sorted(self.holders)))
        blocks, _ = self.holders.pop(key)
        self.allocator.release(blocks)

    @precondition(lambda self: self.holders)
    @rule(data=st.data(), token=st.integers(0, 3))
    def grow(self, data, token):
        key = data.draw(st.sampled_from(sorted(self.holders)))
        blocks, tokens = self.holders[key]
        tokens.append(token)
        try:
            blocks += self.allocator.allocate(self.allocator.blocks_for(len(tokens)) - len(blocks))
        except OutOfBlocks:
            tokens.pop()
            return
        self.allocator.register(blocks, tokens, len(tokens), NEW_CHAIN)

    @invariant()
    def consistent(self):
        self.allocator.check({k: b for k, (b, _) in self.holders.items()})

    def teardown(self):
        for blocks, _ in self.holders.values():
            self.allocator.release(blocks)
        self.allocator.check({})
        assert self.allocator.used_blocks == 0


TestAllocator = AllocatorMachine.TestCase


def test_collision_never_serves_wrong_tokens(monkeypatch):
    import router.blocks as blocks_module

    monkeypatch.setattr(blocks_module, "chain_hash", lambda previous, tokens: 7)  # every block collides
    a = BlockAllocator(8, BLOCK)
    first = a.allocate(2)
    a.register(first, [1, 1, 1, 1, 2, 2, 2, 2], 8, NEW_CHAIN)
    hits, _ = a.match_prefix([3, 3, 3, 3, 4, 4, 4, 4, 5])
    assert hits == []
