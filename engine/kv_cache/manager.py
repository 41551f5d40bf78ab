"""Per-request KV blocks: allocation of slots, prefix-cache lookups, sharing between samples and beams, and freeing.

A request's block table is the list of blocks holding its tokens in order; token i lives in slot
`table[i // block_size] * block_size + i % block_size`. Every full block of known tokens gets a content hash chained
from its parent's (sha256 over the parent hash, the block's token ids and, for the first block, the request's cache
salt and adapter identity), so equal prefixes map to equal hashes and prefixes never cross tenants or adapters.

Beam search forks (PagedAttention's copy-on-write): a request marked `keep_when_finished` keeps its blocks when it
ends, until `release_kept`; a later request whose tokens extend its computed ones (`fork`) takes references to all
of them, the partially filled last block included, and computes only its new tokens. Before a request writes into
a partial block that others also reference, it gets a private copy: a fresh block and a (source, destination) pair
that the runner copies on the KV tensors before the step's forward (`take_block_copies`). Only a forked request's
first step can meet such a block: after it, its last block is its own.

With a host swap pool (`engine.kv_cache.swap`), a preempted request whose computed blocks are all its own (no prefix
or sample sharing, no beam keeping them) moves them to host memory (`swap_out`) and keeps its computed tokens; its
next `allocate_slots` moves them back into its fresh blocks. Any other preempted request recomputes.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from engine.kv_cache.block_pool import BlockPool, KVBlock
from engine.kv_cache.swap import HostSwap
from engine.request import Request, RequestStatus


@dataclass
class _Kept:
    """A finished request's K/V held for forks: the blocks of its computed tokens, and what they hold."""
    blocks: list[KVBlock]
    token_ids: list[int]
    cache_salt: str | None
    adapter_id: str | None


def root_hash(cache_salt: str | None, adapter_id: str | None) -> bytes:
    h = hashlib.sha256(b"kvbox-prefix-v1")
    for part in (cache_salt, adapter_id):
        h.update(b"\x00" if part is None else b"\x01" + part.encode() + b"\x00")
    return h.digest()


def hash_block(parent_hash: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0):
        self.block_size = block_size
        self.swap = HostSwap(num_host_blocks) if num_host_blocks else None
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._block_ids: dict[str, list[int]] = {}  # mirrors _blocks as plain ids, for the runner's block tables
        self._hashes: dict[str, list[bytes]] = {}
        # How many of a request's leading blocks are already registered in the prefix cache.
        self._num_registered: dict[str, int] = {}
        self._keep: set[str] = set()  # requests whose blocks outlive them, for forks
        self._kept: dict[str, _Kept] = {}
        self._block_copies: list[tuple[int, int]] = []  # (source, destination) block ids, for the next step

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table. The list is kept up to date in place, so callers may hold on to it."""
        return self._block_ids[request_id]

    def num_blocks_of(self, request_id: str) -> int:
        return len(self._blocks.get(request_id, ()))

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """The longest run of the request's leading full blocks already in the cache. At least the last token is
        always left to compute, because its logits are needed to sample."""
        if not self.enable_prefix_caching:
            return []
        hashes = self._block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.pool.record_prefix_queries(max_blocks, len(hits))
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       cached_blocks: list[KVBlock] | None = None) -> bool:
        """Makes room for `num_new_tokens` more tokens after the request's computed ones (and after
        `cached_blocks`, prefix hits that become the start of its table). Returns False, changing nothing, when
        the pool has too few free blocks."""
        cached_blocks = cached_blocks or []
        blocks = self._blocks.setdefault(request.request_id, [])
        num_known = request.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        num_needed = -(-num_known // self.block_size) - len(blocks) - len(cached_blocks)
        # Touching a cached block that is currently free takes it out of the free queue too.
        num_cached_free = sum(1 for b in cached_blocks if b.ref_cnt == 0)
        shared_tail = num_new_tokens > 0 and self._writes_shared_block(request, blocks)
        if max(num_needed, 0) + num_cached_free + int(shared_tail) > self.pool.num_free_blocks:
            if not blocks:
                del self._blocks[request.request_id]
            return False
        if shared_tail:
            self._copy_on_write(request.request_id, request.num_computed_tokens // self.block_size)
        self.pool.touch(cached_blocks)
        new_blocks = cached_blocks + (self.pool.allocate(num_needed) if num_needed > 0 else [])
        blocks.extend(new_blocks)
        self._block_ids.setdefault(request.request_id, []).extend(b.block_id for b in new_blocks)
        if self.swap is not None and self.swap.holds(request.request_id):
            self.swap.swap_in(request.request_id, [b.block_id for b in new_blocks])
        self._cache_full_blocks(request, num_known)
        return True

    def share_prefix(self, source: Request, target: Request) -> int:
        """Gives `target` (a sibling sample with the same prompt) references to `source`'s full prompt blocks, so
        the n samples of one prompt hold its K/V once. Returns the number of tokens `target` now has computed."""
        num_shared_blocks = (source.num_prompt_tokens - 1) // self.block_size
        shared = self._blocks[source.request_id][:num_shared_blocks]
        self.pool.touch(shared)
        self._blocks[target.request_id] = list(shared)
        self._block_ids[target.request_id] = [b.block_id for b in shared]
        return num_shared_blocks * self.block_size

    def keep_when_finished(self, request_id: str) -> None:
        """The request's blocks stay allocated when it finishes normally, for `fork`, until `release_kept`."""
        self._keep.add(request_id)

    def fork(self, parent_id: str, request: Request) -> int:
        """Gives `request` references to the blocks that `parent_id` (finished and kept) computed, if its tokens
        extend those (same cache salt and adapter); returns the number of tokens it now has computed (0: none)."""
        kept = self._kept.get(parent_id)
        if kept is None or (kept.cache_salt, kept.adapter_id) != (request.cache_salt, request.adapter_id):
            return 0
        num_tokens = len(kept.token_ids)
        if num_tokens >= request.num_tokens or request.all_token_ids[:num_tokens] != kept.token_ids:
            return 0
        self.pool.touch(kept.blocks)
        self._blocks[request.request_id] = list(kept.blocks)
        self._block_ids[request.request_id] = [b.block_id for b in kept.blocks]
        return num_tokens

    def release_kept(self, request_ids: list[str]) -> None:
        """Drops the kept blocks of these requests (and the wish to keep those still running)."""
        for request_id in request_ids:
            self._keep.discard(request_id)
            kept = self._kept.pop(request_id, None)
            if kept is not None:
                self.pool.free(reversed(kept.blocks))

    def drop_kept(self) -> int:
        """Frees every request's kept K/V (when the pool must make room); returns how many were dropped."""
        dropped = list(self._kept)
        self.release_kept(dropped)
        return len(dropped)

    def drop_held_blocks(self, waiting: list[Request]) -> bool:
        """For a scheduler that runs nothing and cannot admit a waiting request: what only forks hold gives way.
        Kept K/V is dropped (a later fork of it computes its tokens instead) and waiting forks (beams, samples,
        never run) give up their shared blocks, to compute everything themselves. Returns whether any did."""
        forked = [r for r in waiting if r.num_computed_tokens and not self.is_swapped_out(r)]
        for request in forked:
            self.free(request)
            request.num_computed_tokens = 0
        return self.drop_kept() + len(forked) > 0

    @property
    def num_kept(self) -> int:
        return len(self._kept)

    def swap_out(self, request: Request) -> bool:
        """For a request being preempted: moves the blocks of its computed tokens to host memory and frees the
        device's, if they are all its own and the host pool has room; returns whether it did (else nothing changed,
        and the request recomputes)."""
        if self.swap is None or request.request_id in self._keep:
            return False
        blocks = self._blocks.get(request.request_id, [])
        computed = blocks[:-(-request.num_computed_tokens // self.block_size)]
        if (not computed or len(computed) > self.swap.num_free_blocks
                or any(b.ref_cnt > 1 for b in blocks)):
            return False
        self.free(request)
        self.swap.swap_out(request.request_id, [b.block_id for b in computed])
        return True

    def is_swapped_out(self, request: Request) -> bool:
        return self.swap is not None and self.swap.holds(request.request_id)

    def take_swaps(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The (swap-out, swap-in) block moves queued since the last call, for the step being scheduled."""
        return self.swap.take_moves() if self.swap is not None else ([], [])

    def take_block_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write block copies queued since the last call, for the step being scheduled."""
        copies, self._block_copies = self._block_copies, []
        return copies

    def free(self, request: Request) -> None:
        if self.swap is not None:
            self.swap.drop(request.request_id)  # it ended while swapped out
        blocks = self._blocks.pop(request.request_id, [])
        self._block_ids.pop(request.request_id, None)
        if request.request_id in self._keep and request.is_finished:
            self._keep.discard(request.request_id)
            if request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
                num_kept = -(-request.num_computed_tokens // self.block_size)
                self._kept[request.request_id] = _Kept(
                    blocks[:num_kept], request.all_token_ids[:request.num_computed_tokens], request.cache_salt,
                    request.adapter_id)
                blocks = blocks[num_kept:]  # e.g. those of rejected speculative positions
        self.pool.free(reversed(blocks))
        self._hashes.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    def _writes_shared_block(self, request: Request, blocks: list[KVBlock]) -> bool:
        """Whether the request's next token goes into a partially filled block that another holder references."""
        if request.num_computed_tokens % self.block_size == 0:
            return False
        index = request.num_computed_tokens // self.block_size
        return index < len(blocks) and blocks[index].ref_cnt > 1

    def _copy_on_write(self, request_id: str, index: int) -> None:
        shared = self._blocks[request_id][index]
        (copy,) = self.pool.allocate(1)
        self._blocks[request_id][index] = copy
        self._block_ids[request_id][index] = copy.block_id
        self._block_copies.append((shared.block_id, copy.block_id))
        self.pool.free([shared])

    def _block_hashes(self, request: Request) -> list[bytes]:
        """Hashes of the request's full blocks of known tokens, extended incrementally as tokens arrive."""
        hashes = self._hashes.setdefault(request.request_id, [])
        num_full = request.num_tokens // self.block_size
        parent = hashes[-1] if hashes else root_hash(request.cache_salt, request.adapter_id)
        for i in range(len(hashes), num_full):
            start = i * self.block_size
            parent = hash_block(parent, request.all_token_ids[start:start + self.block_size])
            hashes.append(parent)
        return hashes

    def _cache_full_blocks(self, request: Request, num_known: int) -> None:
        """Registers the blocks that this step fills. Their K/V is written in the step's forward before any
        attention reads it, so another request may reuse them from the same step on."""
        if not self.enable_prefix_caching:
            return
        hashes = self._block_hashes(request)
        blocks = self._blocks[request.request_id]
        start = self._num_registered.get(request.request_id, 0)
        end = min(num_known // self.block_size, len(hashes))
        for i in range(start, end):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_registered[request.request_id] = max(start, end)
