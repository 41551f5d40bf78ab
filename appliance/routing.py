"""Which data-parallel replica serves a request: the least loaded, unless another one already holds the longest cached
prefix of its prompt and is not much busier (SGLang's cache-aware routing; vLLM routes by load only).

`PrefixRouter` keeps, per model, an approximate map of what each replica's prefix cache holds: the chained hashes
of the full blocks of the prompts it was sent, in a bounded LRU. It does not know what a replica has since evicted,
so a stale entry costs one request a cache miss, never a wrong answer. Routing happens once the prompt's tokens are
known (`appliance.openai.serving.start`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from appliance.engines import EngineClient

MAX_ENTRIES = 200_000  # block hashes remembered per model (a few tens of MB at most)


class PrefixRouter:
    def __init__(self, block_size: int, max_busier: int, max_entries: int = MAX_ENTRIES):
        """`max_busier`: how many more in-flight requests the replica holding a prefix may have than the least
        loaded one and still get the request."""
        self.block_size = block_size
        self.max_busier = max_busier
        self.max_entries = max_entries
        self._owner: OrderedDict[int, int] = OrderedDict()  # block hash -> replica index that last computed it
        self.num_routed = 0
        self.num_prefix_routed = 0  # of them, sent to a replica for its cached prefix

    def choose(self, replicas: Sequence[EngineClient], token_ids: list[int]) -> EngineClient:
        """One of the live `replicas` (at least one) for a prompt; remembers the prompt's blocks as the chosen
        replica's."""
        least = min(replicas, key=lambda r: r.num_inflight)
        chosen = least
        hashes = self._block_hashes(token_ids)
        by_index = {r.replica: r for r in replicas}
        for block_hash in reversed(hashes):  # the longest cached prefix first
            owner = by_index.get(self._owner.get(block_hash, -1))
            if owner is not None:
                if owner.num_inflight <= least.num_inflight + self.max_busier:
                    chosen = owner
                    self.num_prefix_routed += owner is not least
                break
        self.num_routed += 1
        for block_hash in hashes:
            self._owner[block_hash] = chosen.replica
            self._owner.move_to_end(block_hash)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)
        return chosen

    def _block_hashes(self, token_ids: list[int]) -> list[int]:
        hashes, parent = [], 0
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            parent = hash((parent, tuple(token_ids[start:start + self.block_size])))
            hashes.append(parent)
        return hashes
