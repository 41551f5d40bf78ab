"""The pool of KV-cache blocks: reference counts, the LRU free queue, the prefix-cache index and usage figures.

A block with a reference count of zero sits in the free queue. If it also has a hash it is "cached": its K/V still
describes a known prefix and can be reused (touched) until the block is handed out again, which evicts it. The free
queue is in eviction order: the least recently freed block goes first. This module knows nothing of requests; the
KV cache manager decides which blocks a request holds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> block, least recently freed first.
        self._free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}
        self.num_prefix_queries = 0  # blocks looked up in the prefix cache
        self.num_prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a reusable prefix."""
        return sum(1 for b in self._free_queue.values() if b.block_hash is not None)

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def record_prefix_queries(self, num_queried: int, num_hit: int) -> None:
        self.num_prefix_queries += num_queried
        self.num_prefix_hits += num_hit

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Takes blocks from the front of the free queue, evicting any prefix they held."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"asked for {num_blocks} blocks with only {self.num_free_blocks} free")
        taken = []
        for _ in range(num_blocks):
            _, block = self._free_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Adds a reference to each block (a prefix-cache hit or a shared block), taking free ones off the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drops one reference from each block; blocks that reach zero join the back of the free queue in the
        order given, so callers pass a request's blocks tail first (its tail is least likely to be shared)."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"freeing {block}, which has no references")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue[block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        """Registers a full block under its content hash. A block already cached keeps its hash; a second block
        with the same content (computed concurrently) stays unregistered and is simply freed later."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (e.g. when an adapter is replaced); blocks in use keep their contents."""
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()

    def block_states(self) -> bytes:
        """One byte per block: 0 free, 1 in use, 2 free but holding a reusable prefix (the dashboard's block map)."""
        return bytes(1 if b.ref_cnt > 0 else (2 if b.block_hash is not None else 0) for b in self.blocks)

    def free_queue_ids(self) -> list[int]:
        return list(self._free_queue)

    def check_integrity(self) -> None:
        """Invariants the tests call after every operation."""
        for block in self.blocks:
            in_queue = block.block_id in self._free_queue
            assert block.ref_cnt >= 0, block
            assert in_queue == (block.ref_cnt == 0), block
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, block
        assert all(b.block_hash == h for h, b in self._cached.items())

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
